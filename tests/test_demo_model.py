"""The bundled demo model: loads offline, answers questions, conversations and description
requests as well as its card says, through the library, its engine core and the server."""

import base64
import io
import json
import uuid

import httpx
import pytest

from services.cli import main
from dartserve.demo import CHECKPOINT, default_model
from dartserve.demo.card import FIXED_CONVERSATIONS, FIXED_DESCRIPTIONS, FIXED_SAMPLE
from dartserve.demo.data import conversation, describe_examples, example, score_description
from dartserve.demo.measure import answer_conversations, answers_right, conversation_accuracy, describe_accuracy
from dartserve.engine import Engine
from dartserve.engine.requests import CoreRequest
from dartserve.models import SamplingConfig
from dartserve.pruning import PruningConfig
from processes import serving

NONE = PruningConfig(method="none")
SAMPLE_IMAGE = example("test", 15490)  # examples/shapes.png
# A conversation about it, each follow-up about another object than the turn before.
TALK = [("what colour is the circle ?", "green"), ("what colour is the square ?", "red"), ("how many objects are there ?", "three")]


@pytest.fixture(scope="module")
def demo():
    return Engine.load(str(CHECKPOINT))


@pytest.fixture(scope="module")
def card():
    return json.loads((CHECKPOINT / "card.json").read_text())


@pytest.fixture(autouse=True)
def bundled_default(monkeypatch):
    monkeypatch.delenv("DARTSERVE_MODEL", raising=False)


def test_default_model_is_the_bundled_checkpoint():
    assert default_model() == str(CHECKPOINT)
    assert sum(f.stat().st_size for f in CHECKPOINT.iterdir()) <= 25_000_000


def test_answers_the_fixed_sample_as_well_as_the_card_says(demo, card):
    right = answers_right(demo, [example("test", i) for i in range(FIXED_SAMPLE)], NONE)
    assert sum(right) / len(right) >= card["fixed_sample"]


def test_describes_the_fixed_sample_as_well_as_the_card_says(demo, card):
    assert describe_accuracy(demo, describe_examples("test", FIXED_DESCRIPTIONS), NONE)["objects"] >= card["describe_fixed_sample"]["objects"]


@pytest.mark.parametrize("continued", [True, False], ids=["continued", "resent"])
def test_follows_up_on_the_fixed_sample_of_conversations_as_the_card_says(demo, card, continued):
    conversations = [conversation("test", i) for i in range(FIXED_CONVERSATIONS)]
    answers = answer_conversations(demo, conversations, NONE, continued)
    mode = "unpruned continued" if continued else "unpruned resent"
    assert conversation_accuracy(conversations, answers)["follow_up"] >= card["talks"][mode]["fixed_sample"]["follow_up"]


def test_a_follow_up_is_answered_about_the_image_with_the_history_resent(demo):
    history = []
    for question, truth in TALK:
        answer = demo.generate([SAMPLE_IMAGE.image], history + [{"role": "user", "content": question}], NONE, SamplingConfig(max_new_tokens=8)).text
        assert answer == truth, (question, history)
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_a_follow_up_is_answered_about_the_image_from_the_engine_core_s_cache(demo):
    loop, key = demo.loop, uuid.uuid4().hex
    sampling = SamplingConfig(max_new_tokens=8)
    said: list[int] = []
    for turn, (question, truth) in enumerate(TALK):
        keep = f"{key}/{turn}" if turn < len(TALK) - 1 else None
        if turn == 0:
            prompt = demo.vision.encode([SAMPLE_IMAGE.image], question)
            request = CoreRequest(uuid.uuid4().hex, prompt, PruningConfig(method="dart", budget=64, layer=2), sampling, keep=keep)
        else:  # only the turn's own tokens are prefilled, on top of the pruned cache of the first
            request = CoreRequest(uuid.uuid4().hex, parent=f"{key}/{turn - 1}", feed=tuple(demo.adapter.turn_ids(said[-1], question)), sampling=sampling, keep=keep)
        said = [token for output in loop.submit(request) for token in output.tokens]
        assert demo.generator.detokenize(said) == truth, question


def test_a_description_of_the_sample_lists_its_objects_in_reading_order(demo):
    text = demo.generate([SAMPLE_IMAGE.image], "Describe the image.", sampling=SamplingConfig(max_new_tokens=48)).text
    score = score_description(text, SAMPLE_IMAGE.objects)
    assert score.objects and score.places, text
    assert [(colour, shape) for colour, shape, _ in score.parsed] == [("red", "square"), ("green", "circle"), ("orange", "triangle")]


@pytest.fixture(scope="module")
def served(redis_server, tmp_path_factory):
    """``dartserve serve`` with the bundled model on a free port (a Redis of the test's own for batches)."""
    with serving({"DARTSERVE_REDIS_URL": redis_server.url}, tmp_path_factory.mktemp("served") / "serve.log") as url:
        yield url


def test_the_server_answers_a_follow_up_about_the_image(served):
    buffer = io.BytesIO()
    SAMPLE_IMAGE.image.save(buffer, "PNG")
    body = {"image": base64.b64encode(buffer.getvalue()).decode()}
    for question, truth in TALK:
        reply = httpx.post(f"{served}/v1/answer", json=body | {"question": question}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["answer"] == truth, question
        body = {"conversation_id": reply.json()["conversation_id"]}
    described = httpx.post(f"{served}/v1/answer", json=body | {"question": "What do you see in this picture?", "max_new_tokens": 48}, timeout=120).json()
    assert score_description(described["answer"], SAMPLE_IMAGE.objects).places, described["answer"]
    assert described["usage"]["completion_tokens"] > 10  # a sentence, decoded token by token


def test_ask_answers_from_the_command_line(demo, tmp_path, capsys):
    e = next(e for e in (example("test", i) for i in range(FIXED_SAMPLE)) if e.question_type == "colour")
    path = tmp_path / "image.png"
    e.image.save(path)
    question = e.question.replace(" ?", "?").capitalize()  # as a person types it
    assert main(["ask", str(path), question]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == demo.generate([e.image], e.question, sampling=SamplingConfig(max_new_tokens=16)).text
    assert answer == e.answer


def test_eval_limit_on_the_bundled_model(tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--limit", "10", "--methods", "none,dart,pooling", "--budgets", "64", "--layers", "0,2", "--out", str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())
    settings = [(r["method"], r["budget"], r["layer"]) for r in rows]
    assert settings == [("none", None, None), ("dart", 64, 0), ("dart", 64, 2), ("pooling", 64, 0), ("pooling", 64, 2)]
    assert rows[0]["kept_tokens"] == 576 and rows[1]["kept_tokens"] == 64
    assert rows[0]["relative_accuracy"] == 1.0
    assert (out / "eval.md").exists() and (out / "eval.png").stat().st_size > 0
