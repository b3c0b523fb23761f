"""A seeded synthetic visual question-answering task on 336 x 336 images (576 LLaVA-1.5 tokens).

Each image holds one to four small objects, each with its own shape and its own colour, on a
grey background, dark to light, uniform or softly textured, so most vision tokens are
near-duplicates and the answer lives in the few tokens that cover the objects. Objects may
touch or overlap a little. Each lies in its own cell of a 3 x 3 grid, its centre clear of the
grid's lines, so that its coarse position ("at the top left") and the reading order of a
description are never in doubt.

Three kinds of sample, each seeded on its own:

- ``example``: one question with a one-word answer, five types equally often;
- ``describe_example``: "describe the image ." (or a paraphrase), answered with one sentence
  naming every object in reading order with its colour, shape and coarse position;
- ``conversation``: one to four turns about one image, any of the six types.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
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
DESCRIBE = "describe"
DESCRIBE_QUESTIONS = ("describe the image .", "describe this picture .", "what is in the image ?", "what do you see in this picture ?")
CELL = SIZE / 3
CLEARANCE = 12  # pixels between an object's centre and the lines of the 3 x 3 grid
# Where each cell of the 3 x 3 grid is, row-major, as a description says it.
PLACES = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the middle", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)  # fmt: skip
MAX_TURNS = 4
SPLIT_SIZE = 1_000_000_000  # indices per split and kind of sample
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    x: float  # centre, pixels
    y: float
    size: float  # bounding-box side, pixels

    @property
    def cell(self) -> int:
        """The cell of the 3 x 3 grid the centre lies in, row-major from the top left."""
        return 3 * int(self.y // CELL) + int(self.x // CELL)


@dataclass(frozen=True)
class Backdrop:
    colour: tuple[int, int, int]  # a grey, faintly tinted
    textured: bool

    @property
    def shade(self) -> str:
        """dark, mid or light, by the grey's level."""
        grey = sum(self.colour) / 3
        return "dark" if grey < 100 else "mid" if grey < 170 else "light"


@dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str
    question_type: str
    objects: tuple[Shape, ...]
    backdrop: Backdrop


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    question_type: str


@dataclass(frozen=True)
class Conversation:
    image: Image.Image
    objects: tuple[Shape, ...]
    turns: tuple[Turn, ...]
    backdrop: Backdrop


def example(split: str, index: int) -> Example:
    """The ``index``-th single question of a split; the same arguments always give the same example."""
    rng = _rng("example", split, index)
    question_type = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:
        objects = _place_objects(rng, 2 if question_type == "position" else 1)
        asked = ask(rng, question_type, objects)
        if asked is not None:
            break
    question, answer = asked
    image, backdrop = _render(rng, objects)
    return Example(image, question, answer, question_type, objects, backdrop)


def describe_example(split: str, index: int) -> Example:
    """The ``index``-th request of a split for a description, the paraphrases in turn."""
    rng = _rng("describe", split, index)
    objects = _place_objects(rng, 1)
    question = DESCRIBE_QUESTIONS[index % len(DESCRIBE_QUESTIONS)]
    image, backdrop = _render(rng, objects)
    return Example(image, question, describe(objects), DESCRIBE, objects, backdrop)


def describe_examples(split: str, count: int) -> list[Example]:
    """The first ``count`` description requests of a split: what a decode workload sends (the
    image and the question) and what ``score_description`` checks the answer against."""
    return [describe_example(split, index) for index in range(count)]


def conversation(split: str, index: int) -> Conversation:
    """The ``index``-th conversation of a split, about one image (see ``conversation_turns``)."""
    rng = _rng("conversation", split, index)
    objects = _place_objects(rng, 1)
    turns = conversation_turns(rng, objects)
    image, backdrop = _render(rng, objects)
    return Conversation(image, objects, turns, backdrop)


def conversation_turns(rng: random.Random, objects: tuple[Shape, ...]) -> tuple[Turn, ...]:
    """One to four turns about the objects, each question of any type (a description at most
    once, no question twice)."""
    turns: list[Turn] = []
    for _ in range(rng.randint(1, MAX_TURNS)):
        while True:
            question_type = rng.choice((*QUESTION_TYPES, DESCRIBE))
            if question_type == DESCRIBE:
                asked = None if any(t.question_type == DESCRIBE for t in turns) else (rng.choice(DESCRIBE_QUESTIONS), describe(objects))
            else:
                asked = ask(rng, question_type, objects)
            if asked is not None and all(t.question != asked[0] for t in turns):
                break
        turns.append(Turn(*asked, question_type))
    return tuple(turns)


def _rng(kind: str, split: str, index: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"example index must be in [0, {SPLIT_SIZE}), got {index}")
    return random.Random(f"{kind}/{split}/{index}")  # a string seed is hashed with SHA-512: the same everywhere


def _place_objects(rng: random.Random, fewest: int) -> tuple[Shape, ...]:
    count = rng.randint(fewest, 4)
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(list(COLOURS), count)
    while True:
        placed: list[Shape] = []
        for shape, colour, cell in zip(shapes, colours, rng.sample(range(9), count)):
            row, column = divmod(cell, 3)
            for _ in range(50):
                size = rng.uniform(34, 62)
                low, high = size / 2 + 4, SIZE - size / 2 - 4  # inside the image
                x = rng.uniform(max(low, column * CELL + CLEARANCE), min(high, (column + 1) * CELL - CLEARANCE))
                y = rng.uniform(max(low, row * CELL + CLEARANCE), min(high, (row + 1) * CELL - CLEARANCE))
                # Centres at least 0.7 sizes apart: objects may touch or overlap a little, never hide each other.
                if all(math.dist((x, y), (o.x, o.y)) >= 0.7 * (size + o.size) / 2 + 8 for o in placed):
                    placed.append(Shape(shape, colour, x, y, size))
                    break
            else:
                break  # no room in this cell beside its neighbours: draw the cells again
        if len(placed) == count:
            return tuple(placed)


def ask(rng: random.Random, question_type: str, objects: tuple[Shape, ...]) -> tuple[str, str] | None:
    """A question and its one-word answer, or None where the objects do not allow this type of question."""
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


def reading_order(objects: tuple[Shape, ...]) -> tuple[Shape, ...]:
    """Row by row from the top, left to right in a row: one object per cell makes it strict."""
    return tuple(sorted(objects, key=lambda o: o.cell))


def object_phrase(o: Shape) -> str:
    return f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.shape} {PLACES[o.cell]}"


def describe(objects: tuple[Shape, ...]) -> str:
    """One sentence: "a red circle at the top left and a blue square at the bottom right." """
    return " and ".join(object_phrase(o) for o in reading_order(objects)) + "."


@dataclass(frozen=True)
class DescriptionScore:
    objects: bool  # every object, colour and shape, in reading order, and nothing else
    places: bool  # and each at its coarse position
    parsed: tuple[tuple[str, str, int], ...] | None  # (colour, shape, cell) per object named; None: not a description


WORD = re.compile(r"\w+|[^\w\s]+")  # how the demo's tokenizer splits text into its words
_PLACE_WORDS = sorted(((p.split(), cell) for cell, p in enumerate(PLACES)), key=lambda p: -len(p[0]))  # longest first


def parse_description(text: str) -> tuple[tuple[str, str, int], ...] | None:
    """(colour, shape, cell) for each object a description names, in its order; None where the
    text is not a list of "a COLOUR SHAPE PLACE" joined by "and" or commas (a full stop may end it)."""
    rest = WORD.findall(text.lower())
    if rest[-1:] == ["."]:
        rest.pop()
    named: list[tuple[str, str, int]] = []
    while True:
        if len(rest) < 3 or rest[0] not in ("a", "an") or rest[1] not in COLOURS or rest[2] not in SHAPES:
            return None
        colour, shape, rest = rest[1], rest[2], rest[3:]
        place = next(((words, cell) for words, cell in _PLACE_WORDS if rest[: len(words)] == words), None)
        if place is None:
            return None
        named.append((colour, shape, place[1]))
        rest = rest[len(place[0]) :]
        if not rest:
            return tuple(named)
        if rest[0] == ",":
            rest = rest[1:]
        if rest[:1] == ["and"]:
            rest = rest[1:]


def score_description(text: str, objects: tuple[Shape, ...]) -> DescriptionScore:
    """A description checked against the objects drawn: the object list (colour and shape in
    reading order) must match exactly; ``places`` also asks every coarse position to."""
    parsed = parse_description(text)
    truth = tuple((o.colour, o.shape, o.cell) for o in reading_order(objects))
    if parsed is None:
        return DescriptionScore(False, False, None)
    same_objects = [p[:2] for p in parsed] == [t[:2] for t in truth]
    return DescriptionScore(same_objects, same_objects and parsed == truth, parsed)


def descriptions_right(texts: list[str], examples: list[Example]) -> float:
    """The share of ``texts``, answers to ``examples``' description requests, that list the
    objects right."""
    return sum(score_description(text, e.objects).objects for text, e in zip(texts, examples, strict=True)) / len(examples)


def named_objects(question_type: str, question: str, objects: tuple[Shape, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The indices of the objects a short question is about, in two roles: the object whose
    colour or shape is asked, every object for a count, the first and the second object of a
    position question. An existence question names the object of its colour first and the
    object of its shape second (shapes and colours are unique in an image): the answer is yes
    where they are one object."""
    words = question.split()
    shapes = [w for w in words if w in SHAPES]
    colours = [w for w in words if w in COLOURS]
    of_shape = lambda shape: tuple(i for i, o in enumerate(objects) if o.shape == shape)  # noqa: E731
    of_colour = tuple(i for i, o in enumerate(objects) if o.colour in colours)
    if question_type == "count":
        return tuple(range(len(objects))), ()
    if question_type == "position":
        return of_shape(shapes[0]), of_shape(shapes[1])
    if question_type == "exists":
        return of_colour, of_shape(shapes[0])
    return (of_shape(shapes[0]) if shapes else of_colour), ()


def _render(rng: random.Random, objects: tuple[Shape, ...]) -> tuple[Image.Image, Backdrop]:
    grey = rng.uniform(40, 235)
    base = tuple(round(grey + rng.uniform(-10, 10)) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), base)
    textured = rng.random() < 0.5
    if textured:  # a soft texture: faint blotches, blurred away to a gentle variation
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
    return image, Backdrop(base, textured)


def patch_objects(objects: tuple[Shape, ...], grid: int = 24) -> list[Shape | None]:
    """The object covering most of each patch of a grid x grid tiling, row-major; None where
    no object covers a fifth of it (background). A small cross's arms are thinner than a patch:
    sampling each patch's centre alone can miss the whole object."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for index, o in enumerate(objects):  # drawn in the image's order, so the top object wins
        _draw(draw, o, index + 1)
    step = SIZE // grid
    patches = np.asarray(mask).reshape(grid, step, grid, step).transpose(0, 2, 1, 3).reshape(grid * grid, step * step)
    cover = np.stack([(patches == index + 1).sum(axis=1) for index in range(len(objects))], axis=1)
    most = cover.argmax(axis=1)
    return [objects[i] if cover[p, i] * 5 >= step * step else None for p, i in enumerate(most)]


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
