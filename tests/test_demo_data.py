"""The synthetic VQA generator: deterministic, and its answers follow from what it drew."""

import collections
import hashlib
import random
from pathlib import Path

import pytest

from dartserve.demo.data import (
    CELL, CLEARANCE, DESCRIBE, MAX_TURNS, NUMBERS, PLACES, QUESTION_TYPES, SIZE, SPLIT_SIZE,
    conversation, conversation_turns, describe, describe_example, describe_examples, example,
    parse_description, patch_objects, reading_order, score_description,
)  # fmt: skip
from dartserve.demo.model import build_processor
from dartserve.demo.train import SEEDS, train


@pytest.mark.parametrize(
    "make, split, index, digest, asked",
    [
        (example, "train", 0, "e212ce0a509fac68", ("what colour is the square ?", "orange")),
        (example, "validation", 5, "bcf263f3b9da08a1", ("what colour is the square ?", "purple")),
        (example, "test", 42, "da6ef6616216675e", ("how many objects are there ?", "two")),
        (
            describe_example, "test", 3, "5efad077b28f06f5",
            ("what do you see in this picture ?", "a purple circle at the top and a red cross on the right and an orange square at the bottom."),
        ),
        (conversation, "test", 7, "7e08924970cb1802", ("what is in the image ?", "a red cross on the left.")),
    ],
)  # fmt: skip
def test_examples_are_fixed_across_runs_and_machines(make, split, index, digest, asked):
    e = make(split, index)
    assert hashlib.sha256(e.image.tobytes()).hexdigest()[:16] == digest
    first = e.turns[0] if hasattr(e, "turns") else e
    assert (first.question, first.answer) == asked


def test_split_ranges_cannot_overlap():
    for make in (example, describe_example, conversation):
        for bad in (-1, SPLIT_SIZE):
            with pytest.raises(ValueError, match="index"):
                make("train", bad)
        with pytest.raises(ValueError, match="split"):
            make("dev", 0)
    with pytest.raises(ValueError, match="seed"):
        train(Path("unused"), seed=SEEDS)


def test_tokenizer_accepts_american_spelling_and_any_case():
    tokenizer = build_processor().tokenizer
    assert tokenizer("What COLOR is the Circle?")["input_ids"] == tokenizer("what colour is the circle ?")["input_ids"]
    assert tokenizer.decode(tokenizer("a red circle at the top left.")["input_ids"], skip_special_tokens=True) == "a red circle at the top left."


def test_every_object_is_visible_in_a_cell_of_its_own():
    for index in range(100):
        for objects in (example("test", index).objects, conversation("test", index).objects):
            visible = collections.Counter(id(o) for o in patch_objects(objects) if o is not None)
            assert all(visible[id(o)] >= 2 for o in objects)
            assert len({o.cell for o in objects}) == len(objects)
            for o in objects:  # its coarse position is never in doubt
                assert min(abs(o.x - k * CELL) for k in (1, 2)) >= CLEARANCE and min(abs(o.y - k * CELL) for k in (1, 2)) >= CLEARANCE


def test_examples_are_deterministic():
    for split in ("train", "validation", "test"):
        a, b = example(split, 17), example(split, 17)
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.question, a.answer, a.objects) == (b.question, b.answer, b.objects)
        assert conversation(split, 17).turns == conversation(split, 17).turns
    assert example("train", 3).image.tobytes() != example("test", 3).image.tobytes()
    assert example("test", 3).image.tobytes() != example("test", 4).image.tobytes()
    assert example("test", 3).image.tobytes() != conversation("test", 3).image.tobytes() != describe_example("test", 3).image.tobytes()


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


def test_backgrounds_range_from_dark_to_light_uniform_or_textured():
    backdrops = collections.Counter((e.backdrop.shade, e.backdrop.textured) for e in (example("test", i) for i in range(300)))
    assert set(backdrops) == {(shade, textured) for shade in ("dark", "mid", "light") for textured in (False, True)}
    assert min(backdrops.values()) >= 25


def test_conversations_ask_about_one_image_in_one_to_four_turns():
    conversations = [conversation("train", i) for i in range(300)]
    assert collections.Counter(len(c.turns) for c in conversations).keys() == set(range(1, MAX_TURNS + 1))
    kinds = collections.Counter(t.question_type for c in conversations for t in c.turns)
    assert set(kinds) == {*QUESTION_TYPES, DESCRIBE}
    for c in conversations:
        questions = [t.question for t in c.turns]
        assert len(set(questions)) == len(questions) and sum(t.question_type == DESCRIBE for t in c.turns) <= 1
        for t in c.turns:
            if t.question_type == DESCRIBE:
                assert t.answer == describe(c.objects)
    turns = conversation_turns(random.Random(1), conversations[0].objects)
    assert turns == conversation_turns(random.Random(1), conversations[0].objects)


def test_a_description_names_every_object_in_reading_order():
    for e in describe_examples("test", 50):
        ordered = reading_order(e.objects)
        assert [o.cell for o in ordered] == sorted(o.cell for o in e.objects)
        assert parse_description(e.answer) == tuple((o.colour, o.shape, o.cell) for o in ordered)
        assert e.answer.endswith(".") and e.answer.count(" and ") == len(e.objects) - 1
        for o in ordered:
            assert f"{o.colour} {o.shape} {PLACES[o.cell]}" in e.answer
    assert describe_examples("test", 2)[1].question != describe_examples("test", 2)[0].question  # the paraphrases in turn


def test_a_description_is_scored_on_its_object_list():
    e = next(e for e in describe_examples("test", 50) if len(e.objects) == 3)
    first, second, third = reading_order(e.objects)
    phrase = lambda o, cell=None: f"{'an' if o.colour == 'orange' else 'a'} {o.colour} {o.shape} {PLACES[o.cell if cell is None else cell]}"  # noqa: E731
    assert score_description(e.answer, e.objects) == score_description(e.answer.upper(), e.objects)
    assert score_description(e.answer, e.objects).places
    commas = f"{phrase(first)}, {phrase(second)}, and {phrase(third)}"
    assert score_description(commas, e.objects).places
    swapped = f"{phrase(second)} and {phrase(first)} and {phrase(third)}."
    assert not score_description(swapped, e.objects).objects
    missing = f"{phrase(first)} and {phrase(second)}."
    assert not score_description(missing, e.objects).objects
    misplaced = f"{phrase(first)} and {phrase(second)} and {phrase(third, (third.cell + 1) % 9)}."
    score = score_description(misplaced, e.objects)
    assert score.objects and not score.places
    for nonsense in ("", "red", "a red circle", "a red circle somewhere.", f"{e.answer} and"):
        assert score_description(nonsense, e.objects).parsed is None


def test_images_give_576_vision_tokens_and_known_words():
    processor = build_processor()
    e = example("test", 0)
    assert e.image.size == (SIZE, SIZE)
    inputs = processor(text=[f"USER: <image>\n{e.question} ASSISTANT:"], images=[e.image], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 576
    for index in range(200):
        for t in conversation("train", index).turns:
            ids = processor.tokenizer(f"{t.question} {t.answer}")["input_ids"]
            assert processor.tokenizer.unk_token_id not in ids
