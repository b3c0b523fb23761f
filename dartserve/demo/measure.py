"""The demo model's answers to whole conversations and to description requests, as served.

A conversation goes one of two ways, as a client sends it: continued, each follow-up prefilled
on top of the cache the turn before left in the engine core (what ``/v1/answer`` does with a
``conversation_id``), or resent, the whole history a new prompt each turn (what an OpenAI client
does). Either way the history holds the model's own answers.
"""

from __future__ import annotations

import uuid

from dartserve.demo.data import DESCRIBE, Conversation, Example, score_description
from dartserve.engine import Engine, Request
from dartserve.engine.requests import CoreRequest
from dartserve.evaluation import DESCRIPTION_TOKENS, is_correct
from dartserve.models import SamplingConfig
from dartserve.pruning import PruningConfig

SAMPLING = SamplingConfig(max_new_tokens=DESCRIPTION_TOKENS)
CHUNK = 16  # conversations in flight at once: their kept blocks stay well inside the pool


def answer_conversations(engine: Engine, conversations: list[Conversation], pruning: PruningConfig, continued: bool) -> list[list[str]]:
    """Each conversation's answers, turn by turn; ``continued`` or resent (see the module)."""
    answers: list[list[str]] = []
    for start in range(0, len(conversations), CHUNK):
        chunk = conversations[start : start + CHUNK]
        answers += (_continued if continued else _resent)(engine, chunk, pruning)
    return answers


def _resent(engine: Engine, conversations: list[Conversation], pruning: PruningConfig) -> list[list[str]]:
    answers: list[list[str]] = [[] for _ in conversations]
    for turn in range(max(len(c.turns) for c in conversations)):
        asked = [i for i, c in enumerate(conversations) if turn < len(c.turns)]
        requests = [Request([conversations[i].image], _history(conversations[i], answers[i], turn), SAMPLING) for i in asked]
        for i, result in zip(asked, engine.generate_batch(requests, pruning)):
            answers[i].append(result.text)
    return answers


def _history(c: Conversation, answers: list[str], turn: int) -> list[dict]:
    messages = []
    for t, answer in zip(c.turns[:turn], answers):
        messages += [{"role": "user", "content": t.question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": c.turns[turn].question}]


def _continued(engine: Engine, conversations: list[Conversation], pruning: PruningConfig) -> list[list[str]]:
    loop, adapter = engine.loop, engine.adapter
    keys = [uuid.uuid4().hex for _ in conversations]
    tokens: list[list[list[int]]] = [[] for _ in conversations]
    for turn in range(max(len(c.turns) for c in conversations)):
        streams = {}
        for i, c in enumerate(conversations):
            if turn >= len(c.turns):
                continue
            question = c.turns[turn].question
            last = turn == len(c.turns) - 1
            keep = None if last else f"{keys[i]}/{turn}"  # the last turn frees its blocks
            if turn == 0:
                request = CoreRequest(uuid.uuid4().hex, engine.vision.encode([c.image], question), pruning, SAMPLING, keep=keep)
            else:
                feed = tuple(adapter.turn_ids(tokens[i][-1][-1], question))
                request = CoreRequest(uuid.uuid4().hex, parent=f"{keys[i]}/{turn - 1}", feed=feed, sampling=SAMPLING, keep=keep)
            streams[i] = loop.submit(request)
        for i, stream in streams.items():
            said = []
            for output in stream:
                if output.error is not None:
                    raise output.error
                said += output.tokens
            tokens[i].append(said)
    return [[engine.generator.detokenize(t) for t in turns] for turns in tokens]


def turn_right(turn, answer: str, objects) -> bool:
    """A short answer matches; a description lists the objects, colour and shape, in reading order."""
    if turn.question_type == DESCRIBE:
        return score_description(answer, objects).objects
    return is_correct(answer, (turn.answer,))


def conversation_accuracy(conversations: list[Conversation], answers: list[list[str]]) -> dict[str, float]:
    """Per-turn accuracy: first turns, follow-ups, and the follow-ups by question type."""
    right: dict[str, list[bool]] = {"first": [], "follow_up": []}
    for c, said in zip(conversations, answers):
        for number, (turn, answer) in enumerate(zip(c.turns, said)):
            ok = turn_right(turn, answer, c.objects)
            right["follow_up" if number else "first"].append(ok)
            if number:
                right.setdefault(f"follow_up {turn.question_type}", []).append(ok)
    return {kind: round(sum(v) / len(v), 4) for kind, v in right.items() if v}


def answers_right(engine: Engine, examples: list[Example], pruning: PruningConfig, batch_size: int = 16) -> list[bool]:
    """Whether each single question is answered right (a description: its object list)."""
    right = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        results = engine.generate_batch([Request([e.image], e.question, SAMPLING) for e in batch], pruning)
        right += [turn_right(e, r.text, e.objects) for e, r in zip(batch, results)]
    return right


def describe_accuracy(engine: Engine, examples: list[Example], pruning: PruningConfig) -> dict[str, float]:
    """The share of descriptions that list the objects right, and of those that place each right too."""
    results = engine.generate_batch([Request([e.image], e.question, SAMPLING) for e in examples], pruning)
    scores = [score_description(r.text, e.objects) for r, e in zip(results, examples)]
    return {"objects": round(sum(s.objects for s in scores) / len(scores), 4), "places": round(sum(s.places for s in scores) / len(scores), 4)}
