"""Scoring, dataset files and the ``dartserve eval`` reports."""

import json

import pytest

from services.cli import main
from dartserve.evaluation import is_correct, jsonl_items
from tiny_checkpoints import make_image


@pytest.mark.parametrize(
    "prediction, answers, correct",
    [
        ("green", ("green",), True),
        (" Green. ", ("green",), True),
        ("Yes, there is a dog.", ("yes",), True),
        ("no", ("yes",), False),
        ("the red one", ("red one",), True),
        ("two", ("2",), True),
        ("2", ("two",), True),
        ("", ("yes",), False),
        ("greenish", ("green",), False),
    ],
)
def test_scoring(prediction, answers, correct):
    assert is_correct(prediction, answers) is correct


def write_dataset(folder, count=3):
    lines = []
    for i in range(count):
        make_image(i).save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "question": "is it red?", "answer": ["yes", "no"][i % 2], "type": "pope"}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_dataset(tmp_path):
    items = jsonl_items(write_dataset(tmp_path))
    assert [(i.question, i.answers, i.question_type) for i in items][:2] == [("is it red?", ("yes",), "pope"), ("is it red?", ("no",), "pope")]
    assert items[0].load_image().size == (96, 80)
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text('{"image": "img0.png", "question": "how many?", "answer": 2}\n')
    assert jsonl_items(numeric)[0].answers == ("2",)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"image": "img0.png", "question": "q"}', "bad.jsonl:1"),
        ('{"image": "missing.png", "question": "q", "answer": "cat"}', "no image"),
        ('{"image": "img0.png", "question": "q", "answer": "the"}', "empty"),
        ('{"image": "img0.png", "question": "q", "answer": null}', "answer must be"),
        ('{"image": 3, "question": "q", "answer": "a"}', "strings"),
        ("not json", "JSON"),
        ('{"image": "notes.png", "question": "q", "answer": "cat"}', "not a readable image"),
    ],
)
def test_jsonl_dataset_errors(tmp_path, line, message):
    write_dataset(tmp_path, count=1)
    (tmp_path / "notes.png").write_text("a text file with an image's name")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        jsonl_items(bad)
    with pytest.raises(ValueError, match="cannot read"):
        jsonl_items(tmp_path / "nothing.jsonl")


def test_eval_writes_json_markdown_and_plot(checkpoints, tmp_path, capsys):
    dataset = write_dataset(tmp_path, count=4)
    out = tmp_path / "out"
    args = ["eval", "--model", str(checkpoints["llava"]), "--dataset", str(dataset), "--limit", "3",
            "--methods", "none,dart,random", "--budgets", "16,8", "--layers", "1,2", "--out", str(out), "--max-new-tokens", "2"]
    assert main(args) == 0
    assert "100%" in capsys.readouterr().err  # the progress bar
    rows = json.loads((out / "eval.json").read_text())
    grid = [(method, budget, layer) for method in ("dart", "random") for layer in (1, 2) for budget in (16, 8)]
    assert [(r["method"], r["budget"], r["layer"]) for r in rows] == [("none", None, None), *grid]
    for row in rows:
        assert row["n"] == 3 and 0 <= row["accuracy"] <= 1 and set(row["per_type"]) == {"pope"}
    # The random tiny model answers nothing right, so accuracy relative to it is undefined.
    assert all(r["relative_accuracy"] is None for r in rows) if rows[0]["accuracy"] == 0 else rows[0]["relative_accuracy"] == 1.0
    assert rows[0]["kept_tokens"] == 36
    assert rows[2]["kept_tokens"] == 8
    assert "| dart | 8 | 2 | 8 |" in (out / "eval.md").read_text()
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # An --out that is a file is refused before the model is loaded, not after the run.
    (tmp_path / "taken").write_text("")
    assert main(args[:-4] + ["--out", str(tmp_path / "taken")] + args[-2:]) == 2
    assert "is a file" in capsys.readouterr().err


def test_eval_accuracy_counts_the_answers_that_match():
    from dartserve.demo import CHECKPOINT
    from dartserve.engine import Engine
    from dartserve.evaluation import Item, evaluate, synthetic_items
    from dartserve.models import SamplingConfig
    from dartserve.pruning import PruningConfig

    engine = Engine.load(str(CHECKPOINT))
    settings = [PruningConfig(method="none"), PruningConfig(method="dart", budget=8)]
    source = synthetic_items("test", 4)
    said = {
        (s.method, i): engine.generate([item.load_image()], item.question, s, SamplingConfig(max_new_tokens=8)).text
        for s in settings
        for i, item in enumerate(source)
    }
    # Items 0-2 take the unpruned model's answer as the truth, item 3 a word it never says.
    items = [Item(item.load_image, item.question, (said["none", i] if i < 3 else "zebra",), "ab"[i // 2]) for i, item in enumerate(source)]
    rows = evaluate(engine, items, settings, batch_size=3, progress=False)
    assert (rows[0]["accuracy"], rows[0]["per_type"]) == (0.75, {"a": 1.0, "b": 0.5})
    right = [said["dart", i] == said["none", i] for i in range(3)]
    assert rows[1]["accuracy"] == sum(right) / 4 and rows[1]["per_type"] == {"a": sum(right[:2]) / 2, "b": right[2] / 2}
    assert rows[1]["relative_accuracy"] == round(rows[1]["accuracy"] / 0.75, 4)


def test_eval_appends_the_prompt_suffix_to_every_question():
    from dartserve.demo import CHECKPOINT
    from dartserve.engine import Engine
    from dartserve.evaluation import Item, evaluate, synthetic_items
    from dartserve.models import SamplingConfig
    from dartserve.pruning import PruningConfig

    engine = Engine.load(str(CHECKPOINT))
    suffix = " red red red"  # words that change what the demo model says to most questions
    source = synthetic_items("test", 6)
    plain = [engine.generate([i.load_image()], i.question, sampling=SamplingConfig(max_new_tokens=8)).text for i in source]
    suffixed = [engine.generate([i.load_image()], i.question + suffix, sampling=SamplingConfig(max_new_tokens=8)).text for i in source]
    assert plain != suffixed
    items = [Item(i.load_image, i.question, (answer,), "q") for i, answer in zip(source, suffixed)]
    (row,) = evaluate(engine, items, [PruningConfig(method="none")], prompt_suffix=suffix, progress=False)
    assert row["accuracy"] == 1.0


def test_the_synthetic_split_ends_with_descriptions_scored_on_the_objects_they_list():
    from dartserve.demo import CHECKPOINT
    from dartserve.demo.data import describe_example, score_description
    from dartserve.engine import Engine
    from dartserve.evaluation import DESCRIPTION_TOKENS, DESCRIPTIONS, SPLIT_SIZES, evaluate, synthetic_items
    from dartserve.models import SamplingConfig
    from dartserve.pruning import PruningConfig

    items = synthetic_items("test")
    assert len(items) == SPLIT_SIZES["test"] + DESCRIPTIONS
    assert {i.question_type for i in items[: SPLIT_SIZES["test"]]} == {"colour", "shape", "count", "exists", "position"}
    assert {i.question_type for i in items[SPLIT_SIZES["test"] :]} == {"describe"}
    described = items[SPLIT_SIZES["test"] : SPLIT_SIZES["test"] + 4]
    engine = Engine.load(str(CHECKPOINT))
    said = [engine.generate([i.load_image()], i.question, sampling=SamplingConfig(max_new_tokens=DESCRIPTION_TOKENS)).text for i in described]
    truth = [score_description(text, describe_example("test", n).objects).objects for n, text in enumerate(said)]
    assert [i.score(text) for i, text in zip(described, said)] == truth
    # A description is decoded whole even where the run's limit is a short answer's.
    (row,) = evaluate(engine, described, [PruningConfig(method="none")], max_new_tokens=8, progress=False)
    assert row["per_type"] == {"describe": sum(truth) / 4}
