"""The synthetic VQA generator: deterministic, and its answers follow from what it drew."""

import collections
import hashlib
from pathlib import Path

import pytest

from dartserve.demo.data import NUMBERS, QUESTION_TYPES, SIZE, SPLIT_SIZE, example, patch_objects
from dartserve.demo.model import build_processor
from dartserve.demo.train import SEEDS, train


@pytest.mark.parametrize(
    "split, index, digest, question, answer",
    [
        ("train", 0, "80a56f5fe7a56624", "what colour is the cross ?", "yellow"),
        ("validation", 5, "3560c57173645b90", "what colour is the square ?", "orange"),
        ("test", 42, "4ac9238e1b767c9b", "how many objects are there ?", "four"),
    ],
)
def test_examples_are_fixed_across_runs_and_machines(split, index, digest, question, answer):
    e = example(split, index)
    assert hashlib.sha256(e.image.tobytes()).hexdigest()[:16] == digest
    assert (e.question, e.answer) == (question, answer)


def test_split_ranges_cannot_overlap():
    for bad in (-1, SPLIT_SIZE):
        with pytest.raises(ValueError, match="index"):
            example("train", bad)
    with pytest.raises(ValueError, match="seed"):
        train(Path("unused"), seed=SEEDS)


def test_tokenizer_accepts_american_spelling_and_any_case():
    tokenizer = build_processor().tokenizer
    assert tokenizer("What COLOR is the Circle?")["input_ids"] == tokenizer("what colour is the circle ?")["input_ids"]


def test_every_object_is_visible():
    for index in range(100):
        e = example("test", index)
        visible = collections.Counter(id(o) for o in patch_objects(e.objects) if o is not None)
        assert all(visible[id(o)] >= 2 for o in e.objects)


def test_examples_are_deterministic():
    for split in ("train", "validation", "test"):
        a, b = example(split, 17), example(split, 17)
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.question, a.answer, a.objects) == (b.question, b.answer, b.objects)
    assert example("train", 3).image.tobytes() != example("test", 3).image.tobytes()
    assert example("test", 3).image.tobytes() != example("test", 4).image.tobytes()
    with pytest.raises(ValueError):
        example("dev", 0)


def test_answers_follow_from_the_objects():
    for index in range(300):
        e = example("train", index)
        objects = e.objects
        words = e.question.split()
        if e.question_type == "colour":
            assert e.answer == next(o.colour for o in objects if o.shape == words[4])
        elif e.question_type == "shape":
            assert e.answer == next(o.shape for o in objects if o.colour == words[4])
        elif e.question_type == "count":
            assert e.answer == NUMBERS[len(objects)]
        elif e.question_type == "exists":
            assert e.answer == ("yes" if (words[3], words[4]) in {(o.colour, o.shape) for o in objects} else "no")
        else:
            a = next(o for o in objects if o.shape == words[2])
            b = next(o for o in objects if o.shape == words[-2])
            before = a.x < b.x if words[3] == "left" else a.y < b.y
            assert e.answer == ("yes" if before else "no")


def test_question_types_and_answers_are_balanced():
    examples = [example("test", i) for i in range(500)]
    types = collections.Counter(e.question_type for e in examples)
    assert set(types) == set(QUESTION_TYPES) and set(types.values()) == {100}
    for kind in ("exists", "position"):
        yes = sum(e.answer == "yes" for e in examples if e.question_type == kind)
        assert 35 <= yes <= 65, kind


def test_images_give_576_vision_tokens_and_known_words():
    processor = build_processor()
    e = example("test", 0)
    assert e.image.size == (SIZE, SIZE)
    inputs = processor(text=[f"USER: <image>\n{e.question} ASSISTANT:"], images=[e.image], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 576
    for index in range(200):
        e = example("train", index)
        ids = processor.tokenizer(f"{e.question} {e.answer}")["input_ids"]
        assert processor.tokenizer.unk_token_id not in ids
