"""Training the demo model on the synthetic task: ``dartserve train-demo``.

Each step draws a fresh batch from the generator's train split, so there is no epoch and no
overfitting to a fixed set. A run from scratch has four phases:

1. The vision tower alone learns to name the shape and colour of the object under each patch,
   and where the patch lies. Inside an object every patch looks the same, so naming its shape
   means attending to the object's edges; a vision transformer trained from scratch learns
   that slowly, and much faster without the language model's cost in every step. Object
   patches weigh more than the background, or the background's many patches drown them.
2. With the vision tower fixed, the projector and the language model learn the answers from
   every object patch and a random sample of the background, each kept patch at its place in
   the whole sequence (as after pruning). A sequence a fifth as long makes a step about four
   times cheaper. The loss is the answer word and end-of-sequence token, plus the same probes
   on the projected vision tokens (and the object count from their mean), plus the two
   signals of ``dartserve.demo.guidance`` that teach the language model where to look.
3. The same on every patch, so the model answers from the whole image as served.
4. Phase two again, at a lower rate, with the place signals of ``PlaceProbe`` and every other
   example a position question: the heads that find the named objects learn to carry where
   they lie, which position questions need and the first three phases did not teach.

The probes are dropped after training.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from transformers import LlavaForConditionalGeneration

from dartserve.bench import cpu_name
from dartserve.demo.data import COLOURS, QUESTION_TYPES, SHAPES, SIZE, SPLIT_SIZE, example, named_roles, patch_objects
from dartserve.demo.guidance import GUIDED_LAYER, PlaceProbe, QuestionProbe, guided_attention_loss, guided_values
from dartserve.demo.model import PATCH, build_model, build_processor

AUX_WEIGHT = 0.5
OBJECT_WEIGHT = 10.0  # an object patch's weight in the probes' loss; background patches weigh 1
SEED_STRIDE = 10_000_000  # train examples per seed: seeds never share examples
SEEDS = SPLIT_SIZE // SEED_STRIDE
COLOUR_NAMES = list(COLOURS)
# The generator draws its images at the processor's size, so resizing and cropping them changes
# nothing (a test checks it) and would only cost time in every step.
AS_DRAWN = {"do_resize": False, "do_center_crop": False}
_AXIS = torch.linspace(-1, 1, SIZE // PATCH)
PATCH_GRID = torch.stack(torch.meshgrid(_AXIS, _AXIS, indexing="ij")[::-1], dim=-1).reshape(1, -1, 2)  # (column, row), row-major


@dataclass
class PatchTargets:
    """Per patch of each example, ``[batch, 576]``: the shape and colour classes of the object
    under it (0: background) and that object's role in the question (see ``named_roles``)."""

    shapes: torch.Tensor
    colours: torch.Tensor
    roles: torch.Tensor
    counts: torch.Tensor  # objects per example, ``[batch]``

    @classmethod
    def of(cls, examples) -> PatchTargets:
        shapes, colours, roles = [], [], []
        for e in examples:
            role_of = {id(o): r for o, r in zip(e.objects, named_roles(e))}
            under = patch_objects(e.objects)
            shapes.append([0 if o is None else SHAPES.index(o.shape) + 1 for o in under])
            colours.append([0 if o is None else COLOUR_NAMES.index(o.colour) + 1 for o in under])
            roles.append([0 if o is None else role_of[id(o)] for o in under])
        return cls(torch.tensor(shapes), torch.tensor(colours), torch.tensor(roles), torch.tensor([len(e.objects) for e in examples]))


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
        self.count = torch.nn.Linear(width, 5) if count else None
        self.where = torch.nn.Linear(width, 2)  # the patch's column and row, scaled to [-1, 1]

    def loss(self, vision_tokens: torch.Tensor, targets: PatchTargets) -> tuple[torch.Tensor, float]:
        """``vision_tokens`` ``[batch, 576, width]``; returns the loss and the shape accuracy on object patches."""
        shapes = targets.shapes.flatten()
        on_object = shapes > 0
        shape_logits = self.shape(vision_tokens).flatten(0, 1)
        colour_logits = self.colour(vision_tokens).flatten(0, 1)
        loss = _weighted_loss(shape_logits, shapes, on_object) + _weighted_loss(colour_logits, targets.colours.flatten(), on_object)
        # Where each token lies, so that a relative position can be read off the tokens themselves.
        loss = loss + torch.nn.functional.mse_loss(self.where(vision_tokens), PATCH_GRID.expand(len(vision_tokens), -1, -1))
        if self.count is not None:
            loss = loss + torch.nn.functional.cross_entropy(self.count(vision_tokens.mean(dim=1)), targets.counts)
        accuracy = float((shape_logits[on_object].argmax(-1) == shapes[on_object]).float().mean())
        return loss, accuracy


def cosine_schedule(steps: int, warmup: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    return lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0))))


def pretrain_vision(model, processor, steps: int, batch_size: int, lr: float, warmup: int, seed: int, log_every: int = 25) -> dict:
    """Phase one: the vision tower learns, through the probes alone, what lies under each patch."""
    tower = model.model.vision_tower
    # No count probe here: pulling the mean of all tokens towards the count slowed the shapes down.
    heads = AuxiliaryHeads(tower.config.hidden_size, count=False)
    parameters = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps, warmup))
    log = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "history": []}
    started, running, running_accuracy = time.time(), 0.0, 0.0
    tower.train()
    for step in range(steps):
        first = seed * SEED_STRIDE + SEED_STRIDE // 2 + step * batch_size  # apart from phase two's examples
        examples = [example("train", first + i) for i in range(batch_size)]
        pixels = processor.image_processor([e.image for e in examples], return_tensors="pt", **AS_DRAWN)["pixel_values"]
        # The encoder's last layer before its final norm, without CLS: what LLaVA's projector reads.
        tokens = tower(pixel_values=pixels).last_hidden_state[:, 1:]
        loss, accuracy = heads.loss(tokens, PatchTargets.of(examples))
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
    return log


def batch_inputs(processor, examples):
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e.question}]}],
            add_generation_prompt=True,
        )
        for e in examples
    ]
    texts = [f"{p} {e.answer}</s>" for p, e in zip(prompts, examples)]
    return processor(text=texts, images=[e.image for e in examples], return_tensors="pt", padding=True, **AS_DRAWN)


def answer_labels(inputs) -> torch.Tensor:
    """Targets for the last two real tokens of each row (the answer word and ``</s>``); the rest ignored."""
    mask = inputs["attention_mask"]
    if not bool((mask[:, :-1] >= mask[:, 1:]).all()):
        raise ValueError("training batches must be padded on the right")
    labels = torch.full_like(inputs["input_ids"], -100)
    lengths = inputs["attention_mask"].sum(dim=1)
    for row, length in enumerate(lengths.tolist()):
        labels[row, length - 2 : length] = inputs["input_ids"][row, length - 2 : length]
    return labels


def _sequences(inputs, projected: torch.Tensor, embed, image_token: int, keep: list[torch.Tensor]):
    """The language model's inputs with only the ``keep`` patches of each image (sorted patch
    indices), at their positions in the whole sequence, as after pruning; padded on the right.
    Returns the embeddings, the attention mask, the position ids, the answer labels and each
    row's first vision token."""
    rows, positions, labels, starts = [], [], [], []
    for row, kept in enumerate(keep):
        ids = inputs["input_ids"][row, : int(inputs["attention_mask"][row].sum())]
        start = int((ids == image_token).nonzero()[0])
        end = start + projected.shape[1]
        rows.append(torch.cat([embed(ids[:start]), projected[row, kept], embed(ids[end:])]))
        positions.append(torch.cat([torch.arange(start), start + kept, torch.arange(end, len(ids))]))
        answer = torch.full((len(positions[-1]),), -100)
        answer[-2:] = ids[-2:]  # the answer word and </s>
        labels.append(answer)
        starts.append(start)
    pad = torch.nn.utils.rnn.pad_sequence
    mask = pad([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
    return pad(rows, batch_first=True), mask, pad(positions, batch_first=True), pad(labels, batch_first=True, padding_value=-100), starts


def _kept_patches(targets: PatchTargets, background: int | None, generator: torch.Generator) -> list[torch.Tensor]:
    """Every object patch and a random sample of up to ``background`` background patches per
    example (a size drawn afresh each time); all patches where ``background`` is None."""
    if background is None:
        return [torch.arange(targets.shapes.shape[1])] * len(targets.shapes)
    keep = []
    for shapes in targets.shapes:
        empty = (shapes == 0).nonzero().flatten()
        count = int(torch.randint(0, background + 1, (1,), generator=generator))
        sample = empty[torch.randperm(len(empty), generator=generator)[:count]]
        keep.append(torch.cat([(shapes > 0).nonzero().flatten(), sample]).sort().values)
    return keep


class LanguageHeads(torch.nn.Module):
    """Everything phases two to four train beside the model; dropped after training."""

    def __init__(self, width: int, head_dim: int, place: bool) -> None:
        super().__init__()
        self.probes = AuxiliaryHeads(width)
        self.question = QuestionProbe(width)
        self.place = PlaceProbe(head_dim, width) if place else None


def language_step(model, processor, examples, heads: LanguageHeads, background: int | None, generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One forward pass of phase two, three or four: the answer loss, the training signals' loss, and
    the guided heads' mean attention on the named objects. The vision tower is fixed."""
    inputs = batch_inputs(processor, examples)
    targets = PatchTargets.of(examples)
    with torch.no_grad():
        # The encoder's last layer before its final norm, without CLS: what LLaVA's projector reads.
        features = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 1:]
    projected = model.model.multi_modal_projector(features)
    probes, _ = heads.probes.loss(projected, targets)
    keep = _kept_patches(targets, background, generator)
    embeds, mask, positions, labels, starts = _sequences(inputs, projected, model.get_input_embeddings(), model.config.image_token_index, keep)
    outputs = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    logits = model.lm_head(outputs.last_hidden_state)
    answer = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    asking = mask.sum(dim=1) - 3  # the last prompt token, before the answer word and </s>
    hidden = outputs.hidden_states[GUIDED_LAYER]  # the guided layer's input
    question = heads.question.loss(hidden[torch.arange(len(examples)), asking], [e.question for e in examples])
    roles, vision = torch.zeros_like(mask), torch.zeros_like(mask, dtype=torch.bool)
    for row, (start, kept) in enumerate(zip(starts, keep)):
        roles[row, start : start + len(kept)] = targets.roles[row, kept]
        vision[row, start : start + len(kept)] = True
    guided, share = guided_attention_loss(model, hidden, positions, asking, roles)
    aux = probes + question + guided
    if heads.place is not None:
        places = torch.cat([PATCH_GRID[0, kept] for kept in keep])
        asked = outputs.hidden_states[GUIDED_LAYER + 1][torch.arange(len(examples)), asking]
        aux = aux + heads.place.loss(guided_values(model, hidden)[vision], places, asked, examples)
    return answer, aux, share


def train_language(model, processor, log: dict, name: str, steps: int, batch_size: int, lr: float, warmup: int, seed: int, first: int,
                   background: int | None, out: Path, log_every: int, eval_every: int, eval_size: int, place: bool = False) -> None:
    """Phase two (``background``: how many background patches at most), three (None: all) or,
    with ``place``, four; recorded in ``log[name]``."""
    model.model.vision_tower.requires_grad_(False)
    text = model.config.text_config
    heads = LanguageHeads(text.hidden_size, text.hidden_size // text.num_attention_heads, place)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps, warmup))
    generator = torch.Generator().manual_seed(seed)
    phase = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "background_patches": background, "history": []}
    if place:
        phase["position_share"] = 0.5
    log[name] = phase
    started = time.time()
    running = running_aux = running_share = 0.0
    for step in range(steps):
        model.train()
        start = seed * SEED_STRIDE + first + step * batch_size  # a new seed, as when training on, sees new examples
        examples = [_with_positions(start + i) if place else example("train", start + i) for i in range(batch_size)]
        answer, aux, share = language_step(model, processor, examples, heads, background, generator)
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
            accuracy, by_type = validation_accuracy(model, processor, eval_size)
            print(f"{name} step {step + 1} validation accuracy {accuracy:.3f} " + " ".join(f"{t} {a:.2f}" for t, a in by_type.items()), flush=True)
            phase["history"].append({"step": step + 1, "validation_accuracy": accuracy, "validation_by_type": by_type})
            phase["train_seconds"] = time.time() - started
            _save(out, model, processor, log)
    phase["train_seconds"] = time.time() - started


def _with_positions(index: int):
    """Train examples where every odd index gives a position question (the split's indices 4 mod 5)."""
    return example("train", (5 * index + 4) % SPLIT_SIZE if index % 2 else index)


def train(
    out: Path,
    steps: int = 300,
    batch_size: int = 12,
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
    sampled_steps: int = 6500,
    sampled_background: int = 64,
    place_steps: int = 2500,
    place_lr: float = 5e-4,
    place_warmup: int = 50,
) -> dict:
    """Trains from scratch (phases one to four), or on from the checkpoint ``init`` (phases two
    to four); saves to ``out`` at every evaluation."""
    if min(steps, sampled_steps, vision_steps, sampled_background, place_steps) < 0:
        raise ValueError("step counts and the background sample must not be negative")
    if not 0 <= seed < SEEDS or max(steps, sampled_steps, place_steps) * batch_size > SEED_STRIDE // 4:
        raise ValueError(f"seed must be in [0, {SEEDS}) and steps * batch_size at most {SEED_STRIDE // 4}")
    torch.manual_seed(seed)
    processor = build_processor()
    processor.tokenizer.padding_side = "right"  # so each row's answer sits at its own last real tokens
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
    common = dict(batch_size=batch_size, lr=lr, warmup=warmup, seed=seed, out=out, log_every=log_every, eval_every=eval_every, eval_size=eval_size)
    if sampled_steps:
        train_language(model, processor, log, "sampled", sampled_steps, first=0, background=sampled_background, **common)
    if steps:
        train_language(model, processor, log, "whole", steps, first=SEED_STRIDE // 4, background=None, **common)
    if place_steps:
        common.update(lr=place_lr, warmup=place_warmup)
        train_language(model, processor, log, "place", place_steps, first=3 * SEED_STRIDE // 4, background=sampled_background, place=True, **common)
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
    processor.tokenizer.padding_side = "right"
    (out / "training.json").write_text(json.dumps(log, indent=2))


@torch.inference_mode()
def validation_accuracy(model, processor, size: int, batch_size: int = 25) -> tuple[float, dict[str, float]]:
    """Greedy next-token accuracy on the validation split, unpruned: overall and per question type."""
    model.eval()
    correct = dict.fromkeys(QUESTION_TYPES, 0)
    asked = dict.fromkeys(QUESTION_TYPES, 0)
    for start in range(0, size, batch_size):
        examples = [example("validation", i) for i in range(start, min(size, start + batch_size))]
        inputs = batch_inputs(processor, examples)
        logits = model(**inputs).logits
        labels = answer_labels(inputs)
        for row, e in enumerate(examples):
            answer = int((labels[row] != -100).nonzero()[0])  # the answer word; the position before predicts it
            correct[e.question_type] += int(logits[row, answer - 1].argmax()) == int(labels[row, answer])
            asked[e.question_type] += 1
    return sum(correct.values()) / size, {t: correct[t] / asked[t] for t in QUESTION_TYPES if asked[t]}
