"""The bundled demo model: loads offline, answers as well as its card says, and `eval --limit` works on it."""

import json
import re

import pytest

from services.cli import main
from dartserve.demo import CHECKPOINT, default_model
from dartserve.demo.data import example
from dartserve.engine import Engine, Request
from dartserve.evaluation import is_correct
from dartserve.models import SamplingConfig

SAMPLE = range(100)  # the fixed sample of test examples the model card reports on


@pytest.fixture(scope="module")
def demo():
    return Engine.load(str(CHECKPOINT))


@pytest.fixture(autouse=True)
def bundled_default(monkeypatch):
    monkeypatch.delenv("DARTSERVE_MODEL", raising=False)


def card_accuracy() -> float:
    card = (CHECKPOINT / "README.md").read_text()
    return float(re.search(r"fixed sample[^|]*\|[^|]*\|\s*([\d.]+)%", card).group(1)) / 100


def test_default_model_is_the_bundled_checkpoint():
    assert default_model() == str(CHECKPOINT)
    assert sum(f.stat().st_size for f in CHECKPOINT.iterdir()) <= 25_000_000


def test_answers_the_fixed_sample_as_well_as_the_card_says(demo):
    examples = [example("test", i) for i in SAMPLE]
    sampling = SamplingConfig(max_new_tokens=4)
    results = demo.generate_batch([Request([e.image], e.question, sampling) for e in examples])
    accuracy = sum(is_correct(r.text, (e.answer,)) for r, e in zip(results, examples)) / len(examples)
    assert accuracy >= card_accuracy()


def test_ask_answers_from_the_command_line(demo, tmp_path, capsys):
    e = next(example("test", i) for i in SAMPLE if example("test", i).question_type == "colour")
    path = tmp_path / "image.png"
    e.image.save(path)
    question = e.question.replace(" ?", "?").capitalize()  # as a person types it
    assert main(["ask", str(path), question]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == demo.generate([e.image], e.question, sampling=SamplingConfig(max_new_tokens=16)).text
    assert answer == e.answer  # the card: 98% of colour questions are right


def test_eval_limit_on_the_bundled_model(tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--limit", "10", "--methods", "none,dart,pooling", "--budgets", "64", "--out", str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())
    assert [(r["method"], r["budget"]) for r in rows] == [("none", None), ("dart", 64), ("pooling", 64)]
    assert rows[0]["kept_tokens"] == 576 and rows[1]["kept_tokens"] == 64
    assert rows[0]["relative_accuracy"] == 1.0
    assert (out / "eval.md").exists() and (out / "eval.png").stat().st_size > 0
