"""A seeded synthetic visual question-answering task on 336 x 336 images (576 LLaVA-1.5 tokens).

Each image holds one to four small objects, each with its own shape and its own colour, on a
background that is uniform or softly textured, so most vision tokens are near-duplicates and
the answer lives in the few tokens that cover the objects. Objects may touch or overlap a
little. Questions have one-word answers and come in five types, equally often.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

SIZE = 336
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
NUMBERS = ("zero", "one", "two", "three", "four")  # an image never has zero objects; NUMBERS[n] names n
QUESTION_TYPES = ("colour", "shape", "count", "exists", "position")
SPLIT_SIZE = 1_000_000_000  # indices per split; each split seeds from its own disjoint range
SPLIT_OFFSETS = {"train": 0, "validation": SPLIT_SIZE + 7, "test": 2 * SPLIT_SIZE + 14}


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    x: float  # centre, pixels
    y: float
    size: float  # bounding-box side, pixels


@dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str
    question_type: str
    objects: tuple[Shape, ...]


def example(split: str, index: int) -> Example:
    """The ``index``-th example of a split; the same arguments always give the same example."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLIT_OFFSETS)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"example index must be in [0, {SPLIT_SIZE}), got {index}")
    rng = random.Random(SPLIT_OFFSETS[split] + index)
    question_type = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:
        objects = _place_objects(rng, 2 if question_type == "position" else 1)
        asked = _ask(rng, question_type, objects)
        if asked is not None:
            break
    question, answer = asked
    return Example(_render(rng, objects), question, answer, question_type, objects)


def _place_objects(rng: random.Random, fewest: int) -> tuple[Shape, ...]:
    count = rng.randint(fewest, 4)
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(list(COLOURS), count)
    placed: list[Shape] = []
    for shape, colour in zip(shapes, colours):
        for _ in range(200):
            size = rng.uniform(34, 62)
            x, y = rng.uniform(size / 2 + 4, SIZE - size / 2 - 4), rng.uniform(size / 2 + 4, SIZE - size / 2 - 4)
            # Centres at least 0.7 sizes apart: objects may touch or overlap a little, never hide each other.
            if all(math.dist((x, y), (o.x, o.y)) >= 0.7 * (size + o.size) / 2 + 8 for o in placed):
                placed.append(Shape(shape, colour, x, y, size))
                break
    return tuple(placed)


def _ask(rng: random.Random, question_type: str, objects: tuple[Shape, ...]) -> tuple[str, str] | None:
    """A question and its answer, or None where the objects do not allow this type of question."""
    if question_type == "colour":
        target = rng.choice(objects)
        return f"what colour is the {target.shape} ?", target.colour
    if question_type == "shape":
        target = rng.choice(objects)
        return f"what shape is the {target.colour} object ?", target.shape
    if question_type == "count":
        return "how many objects are there ?", NUMBERS[len(objects)]
    if question_type == "exists":
        present = {(o.colour, o.shape) for o in objects}
        if rng.random() < 0.5:
            colour, shape = rng.choice(sorted(present))
        else:
            # A near miss half the time: a colour or a shape that is in the image, in another pairing.
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            near = [(c, s) for c, s in absent if c in {o.colour for o in objects} or s in {o.shape for o in objects}]
            colour, shape = rng.choice(near if near and rng.random() < 0.5 else absent)
        return f"is there a {colour} {shape} ?", "yes" if (colour, shape) in present else "no"
    # position: two objects far enough apart along the asked axis that the answer is clear
    horizontal = rng.random() < 0.5
    pairs = [
        (a, b)
        for a in objects
        for b in objects
        if a is not b and abs((a.x - b.x) if horizontal else (a.y - b.y)) > 20
    ]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    if horizontal:
        return f"is the {a.shape} left of the {b.shape} ?", "yes" if a.x < b.x else "no"
    return f"is the {a.shape} above the {b.shape} ?", "yes" if a.y < b.y else "no"


def _render(rng: random.Random, objects: tuple[Shape, ...]) -> Image.Image:
    base = tuple(rng.randint(170, 245) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), base)
    if rng.random() < 0.5:  # a soft texture: faint blotches, blurred away to a gentle variation
        draw = ImageDraw.Draw(image)
        for _ in range(30):
            r = rng.uniform(20, 60)
            x, y = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
            shade = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in base)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=shade)
        image = image.filter(ImageFilter.GaussianBlur(12))
    draw = ImageDraw.Draw(image)
    for o in objects:
        _draw(draw, o, COLOURS[o.colour])
    return image


def named_roles(e: Example) -> tuple[int, ...]:
    """Per object, which object the question names: 1 the first, 2 the second, 0 none.

    A counting question names every object. An existence question names an object only where
    both its colour and its shape match, so a "no" names none.
    """
    words = e.question.split()
    if e.question_type == "count":
        return tuple(1 for _ in e.objects)
    if e.question_type == "position":
        first, second = (w for w in words if w in SHAPES)
        return tuple(1 if o.shape == first else 2 if o.shape == second else 0 for o in e.objects)
    shapes = {w for w in words if w in SHAPES}
    colours = {w for w in words if w in COLOURS}
    return tuple(int((not shapes or o.shape in shapes) and (not colours or o.colour in colours)) for o in e.objects)


def patch_objects(objects: tuple[Shape, ...], grid: int = 24) -> list[Shape | None]:
    """The object visible at the centre of each patch of a grid x grid tiling, row-major (None: background)."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for index, o in enumerate(objects):  # drawn in the image's order, so the top object wins
        _draw(draw, o, index + 1)
    step = SIZE / grid
    ids = [mask.getpixel((int((c + 0.5) * step), int((r + 0.5) * step))) for r in range(grid) for c in range(grid)]
    return [objects[i - 1] if i else None for i in ids]


def _draw(draw: ImageDraw.ImageDraw, o: Shape, fill) -> None:
    h = o.size / 2
    if o.shape == "circle":
        draw.ellipse((o.x - h, o.y - h, o.x + h, o.y + h), fill=fill)
    elif o.shape == "square":
        draw.rectangle((o.x - h * 0.85, o.y - h * 0.85, o.x + h * 0.85, o.y + h * 0.85), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(o.x, o.y - h), (o.x - h, o.y + h * 0.8), (o.x + h, o.y + h * 0.8)], fill=fill)
    else:
        arm = h / 3
        draw.rectangle((o.x - h, o.y - arm, o.x + h, o.y + arm), fill=fill)
        draw.rectangle((o.x - arm, o.y - h, o.x + arm, o.y + h), fill=fill)
