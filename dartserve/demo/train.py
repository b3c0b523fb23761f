"""Training the demo model on the synthetic task: ``dartserve train-demo``.

Each step draws a fresh batch from the generator's train split, so there is no epoch and no
overfitting to a fixed set. A run from scratch has two phases:

1. The vision tower alone learns to name the shape and colour of the object under each patch.
   Inside an object every patch looks the same, so naming its shape means attending to the
   object's edges; a vision transformer trained from scratch learns that slowly, and much
   faster without the language model's cost in every step. Object patches weigh more than
   the background, or the background's many patches drown them.
2. The whole model learns the answers: the loss is the answer word and end-of-sequence token,
   plus the same probes on the projected vision tokens (and the object count from their mean).

The probes are dropped after training.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from transformers import LlavaForConditionalGeneration

from dartserve.bench import cpu_name
from dartserve.demo.data import COLOURS, SHAPES, SPLIT_SIZE, example, patch_objects
from dartserve.demo.model import build_model, build_processor

AUX_WEIGHT = 0.5
OBJECT_WEIGHT = 10.0  # an object patch's weight in the probes' loss; background patches weigh 1
SEED_STRIDE = 10_000_000  # train examples per seed: seeds never share examples
SEEDS = SPLIT_SIZE // SEED_STRIDE


class AuxiliaryHeads(torch.nn.Module):
    """Probes on vision tokens; used in training only."""

    def __init__(self, width: int, count: bool = True) -> None:
        super().__init__()
        self.shape = torch.nn.Linear(width, len(SHAPES) + 1)  # class 0: background
        self.colour = torch.nn.Linear(width, len(COLOURS) + 1)
        self.count = torch.nn.Linear(width, 5) if count else None

    def loss(self, vision_tokens: torch.Tensor, examples) -> tuple[torch.Tensor, float]:
        """``vision_tokens`` ``[batch, 576, width]``; returns the loss and the shape accuracy on object patches."""
        under = [patch_objects(e.objects) for e in examples]
        shapes = torch.tensor([[0 if o is None else SHAPES.index(o.shape) + 1 for o in row] for row in under]).flatten()
        colours = torch.tensor([[0 if o is None else list(COLOURS).index(o.colour) + 1 for o in row] for row in under]).flatten()
        weights = torch.where(shapes > 0, OBJECT_WEIGHT, 1.0)
        shape_logits = self.shape(vision_tokens).flatten(0, 1)

        def patch_loss(logits, targets):
            return (torch.nn.functional.cross_entropy(logits, targets, reduction="none") * weights).sum() / weights.sum()

        loss = patch_loss(shape_logits, shapes) + patch_loss(self.colour(vision_tokens).flatten(0, 1), colours)
        if self.count is not None:
            counts = torch.tensor([len(e.objects) for e in examples])
            loss = loss + torch.nn.functional.cross_entropy(self.count(vision_tokens.mean(dim=1)), counts)
        on_object = shapes > 0
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
        pixels = processor.image_processor([e.image for e in examples], return_tensors="pt")["pixel_values"]
        # The encoder's last layer before its final norm, without CLS: what LLaVA's projector reads.
        tokens = tower(pixel_values=pixels).last_hidden_state[:, 1:]
        loss, accuracy = heads.loss(tokens, examples)
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
    return processor(text=texts, images=[e.image for e in examples], return_tensors="pt", padding=True)


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


def train(
    out: Path,
    steps: int = 1500,
    batch_size: int = 12,
    lr: float = 1e-3,
    warmup: int = 100,
    seed: int = 0,
    log_every: int = 25,
    eval_every: int = 300,
    eval_size: int = 200,
    init: Path | None = None,
    vision_steps: int = 1500,
    vision_batch_size: int = 16,
    vision_lr: float = 1e-3,
) -> dict:
    """Trains from scratch (phase one, then two), or on from the checkpoint ``init`` (phase two
    only); saves to ``out`` at every evaluation."""
    if not 0 <= seed < SEEDS or steps * batch_size > SEED_STRIDE:
        raise ValueError(f"seed must be in [0, {SEEDS}) and steps * batch_size at most {SEED_STRIDE}")
    torch.manual_seed(seed)
    processor = build_processor()
    processor.tokenizer.padding_side = "right"  # so each row's answer sits at its own last real tokens
    model = LlavaForConditionalGeneration.from_pretrained(init) if init else build_model(processor.tokenizer)
    vision = None if init or not vision_steps else pretrain_vision(model, processor, vision_steps, vision_batch_size, vision_lr, warmup, seed)
    heads = AuxiliaryHeads(model.config.text_config.hidden_size)
    parameters = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps, warmup))
    log = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "seed": seed,
        "aux_weight": AUX_WEIGHT,
        "init": str(init) if init else None,
        "vision_pretraining": vision,
        # Training on from a checkpoint keeps the record of how that checkpoint was made.
        "earlier": _earlier_runs(init),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "history": [],
    }
    started = time.time()
    running = running_aux = 0.0
    for step in range(steps):
        model.train()
        first = seed * SEED_STRIDE + step * batch_size  # a new seed, as when training on, sees new examples
        examples = [example("train", first + i) for i in range(batch_size)]
        inputs = batch_inputs(processor, examples)
        outputs = model(**inputs, labels=answer_labels(inputs))
        vision_tokens = outputs.image_hidden_states.view(batch_size, -1, outputs.image_hidden_states.shape[-1])
        aux, _ = heads.loss(vision_tokens, examples)
        loss = outputs.loss + AUX_WEIGHT * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        running += outputs.loss.item()
        running_aux += aux.item()
        if (step + 1) % log_every == 0:
            print(
                f"step {step + 1}/{steps} loss {running / log_every:.4f} aux {running_aux / log_every:.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {time.time() - started:.0f}s",
                flush=True,
            )
            log["history"].append({"step": step + 1, "loss": running / log_every, "aux_loss": running_aux / log_every, "seconds": time.time() - started})
            running = running_aux = 0.0
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            accuracy = validation_accuracy(model, processor, eval_size)
            print(f"step {step + 1} validation accuracy {accuracy:.3f}", flush=True)
            log["history"].append({"step": step + 1, "validation_accuracy": accuracy})
            log["train_seconds"] = time.time() - started
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
    processor.tokenizer.padding_side = "right"
    (out / "training.json").write_text(json.dumps(log, indent=2))


@torch.inference_mode()
def validation_accuracy(model, processor, size: int, batch_size: int = 25) -> float:
    """Greedy next-token accuracy on the validation split, unpruned."""
    model.eval()
    correct = 0
    for start in range(0, size, batch_size):
        examples = [example("validation", i) for i in range(start, min(size, start + batch_size))]
        inputs = batch_inputs(processor, examples)
        logits = model(**inputs).logits
        labels = answer_labels(inputs)
        for row in range(len(examples)):
            answer = int((labels[row] != -100).nonzero()[0])  # the answer word; the position before predicts it
            correct += int(logits[row, answer - 1].argmax()) == int(labels[row, answer])
    return correct / size
