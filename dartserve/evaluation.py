"""Accuracy of pruning methods: ``dartserve eval``.

A dataset is a list of ``Item``s: the bundled synthetic task's splits, or a JSONL file with one
object per line, ``{"image": "path", "question": "...", "answer": "..." | ["...", ...],
"type": "..."}``. Image paths are relative to the file; ``type`` is optional and groups the
per-type accuracies (POPE's yes/no, GQA's short answers, ...). The synthetic splits end with
requests for a description, scored on the objects it lists (type ``describe``).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image
from tqdm import tqdm

from dartserve.engine import Engine, Request
from dartserve.models import SamplingConfig
from dartserve.pruning import PruningConfig
from dartserve.pruning.registry import method_spec

SPLIT_SIZES = {"validation": 500, "test": 500}
DESCRIPTIONS = 100  # description requests after a synthetic split's questions
DESCRIPTION_TOKENS = 48  # four objects' description is 33 tokens with </s>


@dataclass(frozen=True)
class Item:
    load_image: Callable[[], Image.Image]
    question: str
    answers: tuple[str, ...]
    question_type: str
    score: Callable[[str], bool] | None = None  # judges the answer instead of matching ``answers``
    max_new_tokens: int | None = None  # what a long answer needs, where the run's limit is less


def synthetic_items(split: str, limit: int | None = None) -> list[Item]:
    """The bundled task's split: its questions, then its description requests (right when the
    objects listed, colour and shape in reading order, are the image's). Images are drawn again
    when loaded rather than held in memory."""
    from dartserve.demo.data import describe_example, example, score_description

    if split not in SPLIT_SIZES:
        raise ValueError(f"the synthetic dataset's evaluation splits are {', '.join(SPLIT_SIZES)}")
    wanted = SPLIT_SIZES[split] + DESCRIPTIONS if limit is None else limit
    items = []
    for index in range(min(wanted, SPLIT_SIZES[split])):
        e = example(split, index)
        items.append(Item(lambda i=index: example(split, i).image, e.question, (e.answer,), e.question_type))
    for index in range(min(wanted - len(items), DESCRIPTIONS)):
        e = describe_example(split, index)
        score = lambda text, objects=e.objects: score_description(text, objects).objects  # noqa: E731
        items.append(Item(lambda i=index: describe_example(split, i).image, e.question, (e.answer,), e.question_type, score, DESCRIPTION_TOKENS))
    return items


def jsonl_items(path: Path, limit: int | None = None) -> list[Item]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the dataset {path}: {error}") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            items.append(_jsonl_item(path, number, line))
            if limit and len(items) == limit:
                break
    if not items:
        raise ValueError(f"{path} holds no examples")
    return items


def _jsonl_item(path: Path, number: int, line: str) -> Item:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
        image, question, answer = record["image"], record["question"], record["answer"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{where}: need a JSON object with image, question and answer ({error})") from None
    answers = tuple(answer) if isinstance(answer, list) else (answer,)
    if not isinstance(question, str) or not isinstance(image, str):
        raise ValueError(f"{where}: image and question must be strings")
    if not answers or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers):
        raise ValueError(f"{where}: answer must be a string, a number or a list of them")
    answers = tuple(str(a) for a in answers)
    if not all(normalise(a) for a in answers):
        raise ValueError(f"{where}: an answer is empty once punctuation and articles are dropped")
    image_path = (path.parent / image).resolve()
    if not image_path.is_file():
        raise ValueError(f"{where}: no image at {image_path}")
    try:
        with Image.open(image_path) as probe:
            probe.verify()
    except (OSError, SyntaxError) as error:  # found before the run, not halfway through it
        raise ValueError(f"{where}: {image_path} is not a readable image ({error})") from None
    return Item(lambda: Image.open(image_path).convert("RGB"), question, answers, str(record.get("type", "all")))


NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalise(text: str) -> str:
    """Lower case, no punctuation or articles, numbers as digits (as VQA scoring does)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(NUMBER_WORDS.get(word, word) for word in text.split() if word not in {"a", "an", "the"})


def is_correct(prediction: str, answers: tuple[str, ...]) -> bool:
    """Exact match after lower-casing and dropping punctuation and articles; a one-word answer
    also matches a prediction that starts with it ("Yes, there is a dog." for "yes")."""
    predicted = normalise(prediction)
    for answer in map(normalise, answers):
        if predicted == answer or (" " not in answer and predicted.split()[:1] == [answer]):
            return True
    return False


def evaluate(
    engine: Engine,
    items: list[Item],
    settings: list[PruningConfig],
    batch_size: int = 8,
    max_new_tokens: int = 8,
    prompt_suffix: str = "",
    progress: bool = True,
) -> list[dict]:
    """One row per setting: overall and per-type accuracy, kept tokens and prefill time.

    ``prompt_suffix`` is appended to every question, as LLaVA's evaluations append "Answer the
    question using a single word or phrase." for short-answer benchmarks.
    """
    if not items:
        raise ValueError("no examples to evaluate")
    for pruning in settings:
        pruning.check_layers(engine.adapter.num_layers)  # fail before hours of work, not after
    rows = []
    bar = tqdm(total=len(items) * len(settings), disable=not progress, unit="q")
    for pruning in settings:
        correct: list[bool] = []
        kept: list[int] = []
        prefill_ms = 0.0
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            requests = [Request([item.load_image()], item.question + prompt_suffix, _sampling(item, max_new_tokens)) for item in batch]
            results = engine.generate_batch(requests, pruning)
            for item, result in zip(batch, results):
                correct.append(item.score(result.text) if item.score else is_correct(result.text, item.answers))
                kept.append(result.stats.vision_tokens_kept)
            prefill_ms += results[0].stats.prefill_ms
            bar.set_description(f"{pruning.method} {pruning.budget or ''}".strip())
            bar.update(len(batch))
        rows.append(_row(pruning, items, correct, kept, prefill_ms / len(items), batch_size))
    bar.close()
    baseline = next((r["accuracy"] for r in rows if r["method"] == "none"), None)
    for row in rows:
        row["relative_accuracy"] = round(row["accuracy"] / baseline, 4) if baseline else None
    return rows


def _sampling(item: Item, max_new_tokens: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max(max_new_tokens, item.max_new_tokens or 0))


def _row(pruning: PruningConfig, items: list[Item], correct: list[bool], kept: list[int], prefill_ms: float, batch_size: int) -> dict:
    by_type: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct):
        by_type.setdefault(item.question_type, []).append(ok)
    return {
        "method": pruning.method,
        "budget": pruning.budget if pruning.prunes else None,
        "ratio": pruning.ratio if pruning.prunes else None,
        "layer": pruning.layer if pruning.prunes else None,
        "n": len(correct),
        "accuracy": round(sum(correct) / len(correct), 4),
        "per_type": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_type.items())},
        "kept_tokens": round(statistics.mean(kept), 2),
        "prefill_ms": round(prefill_ms, 3),  # batch prefill time shared out per request
        "batch_size": batch_size,
    }


def settings_grid(methods: list[str], budgets: list[int], layers: list[int]) -> list[PruningConfig]:
    """``none`` once (the baseline), then every pruning method at every budget and layer it can
    prune at (a method that reads attention has none before the LLM, at layer 0)."""
    grid = [PruningConfig(method="none")]
    for method in methods:
        if method != "none":
            usable = [k for k in layers if k or not method_spec(method).needs_attention]
            grid += [PruningConfig(method=method, budget=b, layer=k) for k in usable for b in budgets]
    return grid
