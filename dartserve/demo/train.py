"""Training the demo model on the synthetic task: ``dartserve train-demo``.

Every sample is a conversation of one to four turns about one image, in the chat template the
server uses; the loss is on every answer's tokens and ``</s>``. A run from scratch has three phases:

1. The vision tower alone learns to name, under each patch, the shape and colour of the object
   there, the cell of the 3 x 3 grid that object lies in, and where the patch itself lies.
   Inside an object every patch looks the same, so naming its shape means attending to the
   object's edges; a vision transformer trained from scratch learns that slowly, and much
   faster without the language model's cost in every step. Object patches weigh more than the
   background, or the background's many patches drown them.
2. With the vision tower fixed, the projector and the language model learn the conversations
   from every object patch and a random sample of the background, each kept patch at its place
   in the whole sequence (as after pruning): a sequence a quarter as long makes a step several
   times cheaper. Beside the answers, the same probes on the projected vision tokens (and the
   object count from their mean) and the signals of ``dartserve.demo.guidance`` that teach the
   language model where to look. The tower is fixed, so each image's tower output serves
   ``reuse`` conversations about it in consecutive steps: the tower's forward pass is most of a
   step's cost.
3. The same on every patch, so the model answers from the whole image as served.

The probes are dropped after training.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from dartserve.bench import cpu_name
from dartserve.demo.data import (
    COLOURS, DESCRIBE, PLACES, SHAPES, SIZE, SPLIT_SIZE, Shape, Turn, conversation, conversation_turns,
    WORD, named_objects, object_phrase, patch_objects, reading_order,
)  # fmt: skip
from dartserve.demo.guidance import GUIDED_LAYER, FoundProbe, PlaceProbe, QuestionProbe, guided_attention_loss, guided_values
from dartserve.demo.model import PATCH, build_model, build_processor

AUX_WEIGHT = 0.5
OBJECT_WEIGHT = 10.0  # an object patch's weight in the probes' loss; background patches weigh 1
SEED_STRIDE = 10_000_000  # train conversations per seed: seeds never share examples
SEEDS = SPLIT_SIZE // SEED_STRIDE
COLOUR_NAMES = list(COLOURS)
# The generator draws its images at the processor's size, so resizing and cropping them changes
# nothing (a test checks it) and would only cost time in every step.
AS_DRAWN = {"do_resize": False, "do_center_crop": False}
GRID = SIZE // PATCH
_AXIS = torch.linspace(-1, 1, GRID)
PATCH_GRID = torch.stack(torch.meshgrid(_AXIS, _AXIS, indexing="ij")[::-1], dim=-1).reshape(1, -1, 2)  # (column, row), row-major


@dataclass
class PatchTargets:
    """Per patch of each image, ``[images, 576]``: the shape and colour classes of the object
    under it, the cell of the 3 x 3 grid that object lies in (all three 0 for the background)
    and which object it is (its index in the image's objects, plus one)."""

    shapes: torch.Tensor
    colours: torch.Tensor
    cells: torch.Tensor
    owners: torch.Tensor
    counts: torch.Tensor  # objects per image, ``[images]``

    @classmethod
    def of(cls, scenes: list[tuple[Shape, ...]]) -> PatchTargets:
        shapes, colours, cells, owners = [], [], [], []
        for objects in scenes:
            under = patch_objects(objects)
            shapes.append([0 if o is None else SHAPES.index(o.shape) + 1 for o in under])
            colours.append([0 if o is None else COLOUR_NAMES.index(o.colour) + 1 for o in under])
            cells.append([0 if o is None else o.cell + 1 for o in under])
            owners.append([0 if o is None else next(i for i, p in enumerate(objects) if p is o) + 1 for o in under])
        tensor = torch.tensor
        return cls(tensor(shapes), tensor(colours), tensor(cells), tensor(owners), tensor([len(o) for o in scenes]))

    def rows(self, index: list[int]) -> PatchTargets:
        return PatchTargets(*(t[index] for t in (self.shapes, self.colours, self.cells, self.owners, self.counts)))


def _weighted_loss(logits: torch.Tensor, targets: torch.Tensor, on_object: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over patches where an object's patch weighs ``OBJECT_WEIGHT`` and the
    background's 1: otherwise the background's many patches drown the objects."""
    weights = torch.where(on_object, OBJECT_WEIGHT, 1.0)
    return (torch.nn.functional.cross_entropy(logits, targets, reduction="none") * weights).sum() / weights.sum()


class AuxiliaryHeads(torch.nn.Module):
    """Probes on vision tokens; used in training only."""

    def __init__(self, width: int, count: bool = True) -> None:
        super().__init__()
        self.shape = torch.nn.Linear(width, len(SHAPES) + 1)  # class 0: background
        self.colour = torch.nn.Linear(width, len(COLOURS) + 1)
        self.cell = torch.nn.Linear(width, len(PLACES) + 1)
        self.count = torch.nn.Linear(width, 5) if count else None
        self.where = torch.nn.Linear(width, 2)  # the patch's column and row, scaled to [-1, 1]

    def loss(self, vision_tokens: torch.Tensor, targets: PatchTargets) -> tuple[torch.Tensor, float]:
        """``vision_tokens`` ``[images, 576, width]``; returns the loss and the shape accuracy on object patches."""
        shapes = targets.shapes.flatten()
        on_object = shapes > 0
        shape_logits = self.shape(vision_tokens).flatten(0, 1)
        loss = _weighted_loss(shape_logits, shapes, on_object)
        loss = loss + _weighted_loss(self.colour(vision_tokens).flatten(0, 1), targets.colours.flatten(), on_object)
        # The object's cell: its coarse position, and its place in a description's reading order.
        loss = loss + _weighted_loss(self.cell(vision_tokens).flatten(0, 1), targets.cells.flatten(), on_object)
        # Where each token lies, so that a relative position can be read off the tokens themselves.
        loss = loss + torch.nn.functional.mse_loss(self.where(vision_tokens), PATCH_GRID.expand(len(vision_tokens), -1, -1))
        if self.count is not None:
            loss = loss + torch.nn.functional.cross_entropy(self.count(vision_tokens.mean(dim=1)), targets.counts)
        accuracy = float((shape_logits[on_object].argmax(-1) == shapes[on_object]).float().mean())
        return loss, accuracy


def cosine_schedule(steps: int, warmup: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    return lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0))))


def tower_features(model, processor, images) -> torch.Tensor:
    """The vision tower's last layer before its final norm, without CLS: what LLaVA's projector reads."""
    pixels = processor.image_processor(images, return_tensors="pt", **AS_DRAWN)["pixel_values"]
    return model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]


def pretrain_vision(model, processor, steps: int, batch_size: int, lr: float, warmup: int, seed: int, log_every: int = 25) -> dict:
    """Phase one: the vision tower learns, through the probes alone, what lies under each patch."""
    tower = model.model.vision_tower
    # No count probe here: pulling the mean of all tokens towards the count slowed the shapes down.
    heads = AuxiliaryHeads(tower.config.hidden_size, count=False)
    parameters = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps, warmup))
    log = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "history": []}
    started, cpu_started, running, running_accuracy = time.time(), time.process_time(), 0.0, 0.0
    tower.train()
    for step in range(steps):
        first = seed * SEED_STRIDE + SEED_STRIDE // 2 + step * batch_size  # apart from the language phases' images
        scenes = [conversation("train", first + i) for i in range(batch_size)]
        loss, accuracy = heads.loss(tower_features(model, processor, [s.image for s in scenes]), PatchTargets.of([s.objects for s in scenes]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        running_accuracy += accuracy
        if (step + 1) % log_every == 0:
            entry = {"step": step + 1, "aux_loss": running / log_every, "object_shape_accuracy": running_accuracy / log_every, "seconds": time.time() - started}
            print(f"vision step {step + 1}/{steps} aux {entry['aux_loss']:.4f} shape {entry['object_shape_accuracy']:.3f} {entry['seconds']:.0f}s", flush=True)
            log["history"].append(entry)
            running = running_accuracy = 0.0
    log["train_seconds"] = time.time() - started
    log["cpu_seconds"] = time.process_time() - cpu_started  # every thread's: other work on the machine inflates the wall time, not this
    return log


@dataclass
class Encoded:
    """A conversation's token ids, its image one placeholder token, and what training reads off them.

    Positions count in ``ids``; ``points`` are where a guided head is pulled to objects:
    (token, the objects head 0 is to find, those head 1 is to find, its weight), objects
    numbered from 1 as ``PatchTargets.owners`` numbers them. Each turn's points weigh 1 in all,
    so a description's many words do not drown the questions."""

    objects: tuple[Shape, ...]

    ids: list[int]
    image_at: int
    labels: list[int] = field(default_factory=list)  # positions whose token is a target: answers and </s>
    # Each target's weight: a turn's tokens share its weight, 1 for a question and one per object
    # for a description, so that a description's many easy words do not drown the questions.
    label_weights: list[float] = field(default_factory=list)
    asking: list[int] = field(default_factory=list)  # each turn's last prompt token, which predicts its answer
    questions: list[str] = field(default_factory=list)
    points: list[tuple[int, frozenset[int], frozenset[int], float]] = field(default_factory=list)


def encode_conversation(vocab: dict[str, int], objects: tuple[Shape, ...], turns: tuple[Turn, ...]) -> Encoded:
    """The ids the chat template gives ``USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...``
    (a test checks it), built from the task's words directly: the template costs more than a step's data."""
    ids = [vocab["<s>"], vocab["user"], vocab[":"], vocab["<image>"]]
    encoded = Encoded(objects, ids, image_at=3)
    for number, turn in enumerate(turns):
        if number:
            ids += [vocab["user"], vocab[":"]]
        ids += [vocab[w] for w in WORD.findall(turn.question)] + [vocab["assistant"], vocab[":"]]
        asking = len(ids) - 1
        answer = WORD.findall(turn.answer)
        encoded.labels += range(len(ids), len(ids) + len(answer) + 1)
        weight = len(objects) if turn.question_type == DESCRIBE else 1
        encoded.label_weights += [weight / (len(answer) + 1)] * (len(answer) + 1)
        ids += [vocab[w] for w in answer] + [vocab["</s>"]]
        encoded.asking.append(asking)
        encoded.questions.append(turn.question)
        if turn.question_type == DESCRIBE:
            # The token before each word looks at the object that word is about.
            about = _description_objects(objects)
            for offset, number_in_order in enumerate(about):
                encoded.points.append((asking + offset, frozenset({number_in_order}), frozenset(), 1 / len(about)))
        else:
            first, second = named_objects(turn.question_type, turn.question, objects)
            encoded.points.append((asking, frozenset(i + 1 for i in first), frozenset(i + 1 for i in second), 1.0))
    return encoded


def _description_objects(objects: tuple[Shape, ...]) -> list[int]:
    """For each word of the description of ``objects``, the object it is about (numbered from
    1): its own phrase's, for "and" and the full stop the phrase before."""
    numbers = []
    for o in reading_order(objects):
        number = next(i for i, p in enumerate(objects) if p is o) + 1
        numbers += [number] * (len(object_phrase(o).split()) + 1)  # the phrase and the "and" or "." after it
    return numbers


@dataclass
class Batch:
    """A language step's inputs: the cached tower output of each row's image, its patch targets
    and its conversation."""

    features: torch.Tensor  # [rows, 576, vision width]
    targets: PatchTargets
    conversations: list[Encoded]


def _kept_patches(targets: PatchTargets, background: int | None, generator: torch.Generator) -> list[torch.Tensor]:
    """Every object patch and a random sample of up to ``background`` background patches per
    image (a size drawn afresh each time); all patches where ``background`` is None."""
    if background is None:
        return [torch.arange(targets.shapes.shape[1])] * len(targets.shapes)
    keep = []
    for shapes in targets.shapes:
        empty = (shapes == 0).nonzero().flatten()
        count = int(torch.randint(0, background + 1, (1,), generator=generator))
        sample = empty[torch.randperm(len(empty), generator=generator)[:count]]
        keep.append(torch.cat([(shapes > 0).nonzero().flatten(), sample]).sort().values)
    return keep


@dataclass
class Sequences:
    """The language model's inputs with only the kept patches of each image, at their positions
    in the whole sequence, as after pruning; padded on the right."""

    embeds: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor  # each label's weight, 0 where there is none
    where: list[torch.Tensor]  # per row, the position in the row of each token of its ``ids``, the image's at its first patch


def build_sequences(conversations: list[Encoded], projected: torch.Tensor, embed, keep: list[torch.Tensor]) -> Sequences:
    rows, positions, labels, weights, where = [], [], [], [], []
    image_len = projected.shape[1]
    for row, (c, kept) in enumerate(zip(conversations, keep)):
        ids = torch.tensor(c.ids)
        start = c.image_at
        rows.append(torch.cat([embed(ids[:start]), projected[row, kept], embed(ids[start + 1 :])]))
        after = len(ids) - start - 1
        positions.append(torch.cat([torch.arange(start), start + kept, torch.arange(start + image_len, start + image_len + after)]))
        shift = torch.arange(len(ids))
        shift[start + 1 :] += len(kept) - 1
        where.append(shift)
        label = torch.full((len(rows[-1]),), -100)
        targets = torch.tensor(c.labels)
        label[shift[targets]] = ids[targets]
        labels.append(label)
        weight = torch.zeros(len(rows[-1]))
        weight[shift[targets]] = torch.tensor(c.label_weights)
        weights.append(weight)
    pad = torch.nn.utils.rnn.pad_sequence
    mask = pad([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
    return Sequences(
        pad(rows, batch_first=True), mask, pad(positions, batch_first=True), pad(labels, batch_first=True, padding_value=-100), pad(weights, batch_first=True), where
    )


class LanguageHeads(torch.nn.Module):
    """Everything phases two and three train beside the model; dropped after training."""

    def __init__(self, width: int, head_dim: int) -> None:
        super().__init__()
        self.probes = AuxiliaryHeads(width)
        self.question = QuestionProbe(width)
        self.found = FoundProbe(width)
        self.place = PlaceProbe(head_dim)


def language_step(model, batch: Batch, heads: LanguageHeads, background: int | None, generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One forward pass of phase two or three: the answer loss, the training signals' loss, and
    the guided heads' mean attention on the objects they are to find. The vision tower is fixed."""
    projected = model.model.multi_modal_projector(batch.features)
    probes, _ = heads.probes.loss(projected, batch.targets)
    keep = _kept_patches(batch.targets, background, generator)
    seq = build_sequences(batch.conversations, projected, model.get_input_embeddings(), keep)
    outputs = model.model.language_model(inputs_embeds=seq.embeds, attention_mask=seq.mask, position_ids=seq.positions, output_hidden_states=True)
    logits = model.lm_head(outputs.last_hidden_state)
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), seq.labels[:, 1:].flatten(), reduction="none")
    answer = (losses * seq.weights[:, 1:].flatten()).sum() / seq.weights.sum()
    hidden = outputs.hidden_states[GUIDED_LAYER]  # the guided layer's input
    rows, tokens, targets, weights = [], [], [], []
    asking_rows, asking_tokens = [], []
    length = seq.mask.shape[1]
    for row, (c, kept) in enumerate(zip(batch.conversations, keep)):
        owners = torch.zeros(length, dtype=torch.long)
        start = c.image_at
        owners[start : start + len(kept)] = batch.targets.owners[row, kept]
        for token, *named, weight in c.points:
            rows.append(row)
            tokens.append(int(seq.where[row][token]))
            targets.append(torch.stack([torch.isin(owners, torch.tensor(sorted(n), dtype=torch.long)) for n in named]))
            weights.append(weight)
        asking_rows += [row] * len(c.asking)
        asking_tokens += [int(seq.where[row][t]) for t in c.asking]
    rows, tokens = torch.tensor(rows), torch.tensor(tokens)
    guided, share = guided_attention_loss(model, hidden, seq.positions, rows, tokens, torch.stack(targets), torch.tensor(weights))
    asking_rows, asking_tokens = torch.tensor(asking_rows), torch.tensor(asking_tokens)
    question = heads.question.loss(hidden[asking_rows, asking_tokens], [q for c in batch.conversations for q in c.questions])
    vision = torch.zeros_like(seq.mask, dtype=torch.bool)
    for row, (c, kept) in enumerate(zip(batch.conversations, keep)):
        vision[row, c.image_at : c.image_at + len(kept)] = True
    place = heads.place.loss(guided_values(model, hidden)[vision], torch.cat([PATCH_GRID[0, kept] for kept in keep]))
    found, centres = _found_targets(batch.conversations)
    found = heads.found.loss(outputs.hidden_states[GUIDED_LAYER + 1][rows, tokens], found, centres, torch.tensor(weights))
    return answer, probes + question + guided + found + place, share


def _found_targets(conversations: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point of every conversation and per guided head, the shape, colour and cell class of
    the one object the head is to find (-1 where it is to find none, or several, as for a
    count) and how many it is to find; and the one object's centre in [-1, 1]."""
    found, centres = [], []
    for c in conversations:
        for _, *named, _ in c.points:
            classes, places = [], []
            for numbers in named:
                o = c.objects[next(iter(numbers)) - 1] if len(numbers) == 1 else None
                classes.append([-1] * 3 + [len(numbers)] if o is None else [SHAPES.index(o.shape), COLOUR_NAMES.index(o.colour), o.cell, 1])
                places.append([0.0, 0.0] if o is None else [o.x / SIZE * 2 - 1, o.y / SIZE * 2 - 1])
            found.append(classes)
            centres.append(places)
    return torch.tensor(found), torch.tensor(centres)


def language_batches(model, processor, vocab, first: int, steps: int, batch_size: int, reuse: int, generator: torch.Generator):
    """Batches of conversations on train images from ``first`` on. Each chunk of ``reuse``
    steps encodes ``batch_size`` images once and asks ``reuse`` conversations about each; the
    chunk's conversations go into its steps by length, the steps in a random order, so that a
    batch pads its rows little."""
    for chunk in range(0, steps, reuse):
        start = first + chunk // reuse * batch_size
        scenes = [conversation("train", start + i) for i in range(batch_size)]
        with torch.no_grad():
            features = tower_features(model, processor, [s.image for s in scenes])
        targets = PatchTargets.of([s.objects for s in scenes])
        talks = [
            (i, encode_conversation(vocab, s.objects, s.turns if not repeat else conversation_turns(random.Random(f"{start + i}/{repeat}"), s.objects)))
            for repeat in range(reuse)
            for i, s in enumerate(scenes)
        ]
        talks.sort(key=lambda talk: len(talk[1].ids) + int((targets.shapes[talk[0]] > 0).sum()))
        batches = [talks[b : b + batch_size] for b in range(0, len(talks), batch_size)]
        for b in torch.randperm(len(batches), generator=generator)[: steps - chunk].tolist():
            rows = [i for i, _ in batches[b]]
            yield Batch(features[rows], targets.rows(rows), [e for _, e in batches[b]])


def train_language(model, processor, log: dict, name: str, steps: int, batch_size: int, lr: float, warmup: int, seed: int, first: int,
                   background: int | None, reuse: int, out: Path, log_every: int, eval_every: int, validation: Validation, images_from: int = 0) -> None:
    """Phase two (``background``: how many background patches at most) or three (None: all),
    on the phase's images from its ``images_from``-th; recorded in ``log[name]``."""
    model.model.vision_tower.requires_grad_(False)
    text = model.config.text_config
    heads = LanguageHeads(text.hidden_size, text.hidden_size // text.num_attention_heads)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps, warmup))
    generator = torch.Generator().manual_seed(seed)
    phase = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "background_patches": background, "reuse": reuse, "images_from": images_from, "history": []}
    log[name] = phase
    started, cpu_started = time.time(), time.process_time()
    running = running_aux = running_share = 0.0
    vocab = processor.tokenizer.get_vocab()
    batches = language_batches(model, processor, vocab, seed * SEED_STRIDE + first + images_from, steps, batch_size, reuse, generator)
    for step, batch in enumerate(batches):
        model.train()
        answer, aux, share = language_step(model, batch, heads, background, generator)
        optimizer.zero_grad(set_to_none=True)
        (answer + AUX_WEIGHT * aux).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        running += answer.item()
        running_aux += aux.item()
        running_share += share
        if (step + 1) % log_every == 0:
            entry = {
                "step": step + 1,
                "loss": running / log_every,
                "aux_loss": running_aux / log_every,
                "attention_on_named": running_share / log_every,
                "seconds": time.time() - started,
            }
            print(
                f"{name} step {step + 1}/{steps} loss {entry['loss']:.4f} aux {entry['aux_loss']:.4f} "
                f"attention on named {entry['attention_on_named']:.2f} lr {scheduler.get_last_lr()[0]:.2e} {entry['seconds']:.0f}s",
                flush=True,
            )
            phase["history"].append(entry)
            running = running_aux = running_share = 0.0
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            accuracy = validation.accuracy(model)
            print(f"{name} step {step + 1} validation " + " ".join(f"{t} {a:.3f}" for t, a in accuracy.items()), flush=True)
            phase["history"].append({"step": step + 1, "validation": accuracy})
            phase["train_seconds"], phase["cpu_seconds"] = time.time() - started, time.process_time() - cpu_started
            _save(out, model, processor, log)
    phase["train_seconds"], phase["cpu_seconds"] = time.time() - started, time.process_time() - cpu_started


class Validation:
    """Per-turn accuracy on the first ``size`` validation conversations, unpruned and teacher-forced:
    a turn is right when every token of its answer is the most likely one given the turns before,
    which is what greedy decoding gives."""

    def __init__(self, model, processor, size: int, batch_size: int = 25) -> None:
        vocab = processor.tokenizer.get_vocab()
        conversations = [conversation("validation", i) for i in range(size)]
        self.chunks = []
        for start in range(0, size, batch_size):
            chunk = conversations[start : start + batch_size]
            with torch.no_grad():
                features = tower_features(model, processor, [c.image for c in chunk])
            self.chunks.append((features, [encode_conversation(vocab, c.objects, c.turns) for c in chunk], chunk))

    @torch.inference_mode()
    def accuracy(self, model) -> dict[str, float]:
        model.eval()
        right: dict[str, list[bool]] = {}
        for features, encoded, chunk in self.chunks:
            projected = model.model.multi_modal_projector(features)
            keep = [torch.arange(projected.shape[1])] * len(encoded)
            seq = build_sequences(encoded, projected, model.get_input_embeddings(), keep)
            logits = model.model.language_model(inputs_embeds=seq.embeds, attention_mask=seq.mask, position_ids=seq.positions).last_hidden_state
            predicted = model.lm_head(logits).argmax(-1)
            for row, (e, c) in enumerate(zip(encoded, chunk)):
                labels = iter(e.labels)
                for number, turn in enumerate(c.turns):
                    tokens = [next(labels) for _ in range(len(WORD.findall(turn.answer)) + 1)]
                    at = seq.where[row][torch.tensor(tokens)]
                    ok = bool((predicted[row, at - 1] == seq.labels[row, at]).all())
                    kind = DESCRIBE if turn.question_type == DESCRIBE else "first" if number == 0 else "follow_up"
                    right.setdefault(kind, []).append(ok)
                    if turn.question_type != DESCRIBE:
                        right.setdefault(turn.question_type, []).append(ok)
        return {kind: sum(v) / len(v) for kind, v in right.items()}


def train(
    out: Path,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-3,
    warmup: int = 100,
    seed: int = 0,
    log_every: int = 25,
    eval_every: int = 1000,
    eval_size: int = 200,
    init: Path | None = None,
    vision_steps: int = 1500,
    vision_batch_size: int = 16,
    vision_lr: float = 1e-3,
    sampled_steps: int = 6000,
    sampled_background: int = 64,
    reuse: int = 4,
    images_from: int = 0,
) -> dict:
    """Trains from scratch (phases one to three), or on from the checkpoint ``init`` (phases two
    and three); saves to ``out`` at every evaluation. Phase three's images start at its
    ``images_from``-th, so that training on from a checkpoint can take images it was not trained on."""
    if min(steps, sampled_steps, vision_steps, sampled_background, images_from) < 0:
        raise ValueError("step counts, the background sample and images_from must not be negative")
    if not 0 <= seed < SEEDS or max(steps, sampled_steps) * batch_size + images_from > SEED_STRIDE // 4:
        raise ValueError(f"seed must be in [0, {SEEDS}) and steps * batch_size (plus images_from) at most {SEED_STRIDE // 4}")
    torch.manual_seed(seed)
    processor = build_processor()
    model = LlavaForConditionalGeneration.from_pretrained(init) if init else build_model(processor.tokenizer)
    vision = None if init or not vision_steps else pretrain_vision(model, processor, vision_steps, vision_batch_size, vision_lr, warmup, seed)
    log = {
        "seed": seed,
        "aux_weight": AUX_WEIGHT,
        "init": str(init) if init else None,
        "vision_pretraining": vision,
        # Training on from a checkpoint keeps the record of how that checkpoint was made.
        "earlier": _earlier_runs(init),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    validation = Validation(model, processor, eval_size)
    common = dict(batch_size=batch_size, lr=lr, warmup=warmup, seed=seed, reuse=reuse, out=out, log_every=log_every, eval_every=eval_every, validation=validation)
    if sampled_steps:
        train_language(model, processor, log, "sampled", sampled_steps, first=0, background=sampled_background, **common)
    if steps:
        train_language(model, processor, log, "whole", steps, first=SEED_STRIDE // 4, background=None, images_from=images_from, **common)
    if not (sampled_steps or steps):
        _save(out, model, processor, log)
    return log


def _earlier_runs(init: Path | None) -> list[dict]:
    if init is None or not (init / "training.json").is_file():
        return []
    earlier = json.loads((init / "training.json").read_text())
    return earlier.pop("earlier", []) + [earlier]


def _save(out: Path, model, processor, log: dict) -> None:
    model.generation_config.update(
        bos_token_id=processor.tokenizer.bos_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
        do_sample=False,
    )
    processor.tokenizer.padding_side = "left"  # generation pads on the left
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(log, indent=2))
