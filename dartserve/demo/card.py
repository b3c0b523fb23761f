"""The demo checkpoint's model card: its training settings and its measured accuracy."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from dartserve.engine import Engine
from dartserve.evaluation import evaluate, synthetic_items
from dartserve.demo.guidance import GUIDED_LAYER
from dartserve.demo.train import OBJECT_WEIGHT
from dartserve.pruning import PruningConfig

FIXED_SAMPLE = 100  # the first test examples; the tests re-check the model on exactly these


def write_card(checkpoint: Path) -> dict:
    """Measures the checkpoint unpruned on the whole test split and writes ``README.md`` beside it."""
    engine = Engine.load(str(checkpoint))
    training = json.loads((checkpoint / "training.json").read_text())
    (test,) = evaluate(engine, synthetic_items("test"), [PruningConfig(method="none")], progress=False)
    (sample_row,) = evaluate(engine, synthetic_items("test", FIXED_SAMPLE), [PruningConfig(method="none")], progress=False)
    sample = sample_row["accuracy"]
    text_config, vision_config = engine.adapter.model.config.text_config, engine.adapter.model.config.vision_config
    parameters = sum(p.numel() for p in engine.adapter.model.parameters())
    lines = [
        "# dartserve demo model",
        "",
        "A `LlavaForConditionalGeneration` trained from scratch on dartserve's synthetic visual",
        "question-answering task (`dartserve/demo/data.py`). It answers questions about the colour,",
        "shape, number, presence and relative position of small objects on 336 x 336 images",
        "(576 vision tokens, as LLaVA-1.5). It knows only the task's words.",
        "",
        "## Architecture",
        "",
        f"- vision tower: CLIP, {vision_config.num_hidden_layers} layers, width {vision_config.hidden_size}, patch 14, 336 px, last layer's patch tokens",
        "- projector: LLaVA's two-layer MLP (GELU)",
        f"- language model: Llama, {text_config.num_hidden_layers} layers, width {text_config.hidden_size}, {text_config.num_attention_heads} heads, tied embeddings",
        f"- {parameters / 1e6:.2f} M parameters, float32; word-level tokenizer of {text_config.vocab_size} tokens",
        "- prompt: `USER: QUESTION <image>\\nQUESTION ASSISTANT:`: the question comes before the image as",
        "  well as after it, so the vision tokens can see it (attention is causal)",
        "",
        "## Training (`dartserve train-demo`)",
        "",
        *[line for number, run in enumerate(training.get("earlier", []) + [training], start=1) for line in _run_lines(number, run)],
        "Every phase: AdamW (betas 0.9, 0.98), warm-up then cosine decay to 10% of the peak, weight decay 0.01,",
        "gradient clip 1.0, fresh examples at every step. Phase one trains the vision tower alone through",
        f"probes that name the shape and colour under each patch (object patches weigh {OBJECT_WEIGHT:g} times",
        "the background) and where it lies. Phases two to four keep the vision tower fixed and train the",
        f"projector and the language model on the answer word and `</s>`, plus {training['aux_weight']} x: the same probes on the",
        "projected tokens and the object count from their mean; a probe on the asking token that names the",
        f"question's shapes and colours; and the attention of two heads of layer {GUIDED_LAYER}, from the asking token, pulled",
        "to the objects the question names (`dartserve/demo/guidance.py`). Each phase starts its probes anew. Phase two shows every object patch",
        "but only a random sample of the background, each at its place in the whole sequence, as after",
        "pruning; phase three shows every patch. Phase four is phase two again, at a lower rate, with",
        f"every other example a position question and a signal for where things lie: the values heads 0 and 1 of layer {GUIDED_LAYER}",
        "take from each vision token show its place, and the asking token after that layer names where the",
        "named objects lie (`PlaceProbe`). The probes are dropped after training. Validation",
        "accuracy is next-token accuracy on 200 validation questions, with every patch.",
        "",
        "## Accuracy (unpruned, greedy, exact match)",
        "",
        "| set | questions | accuracy |",
        "|---|---|---|",
        f"| test split | {test['n']} | {100 * test['accuracy']:.1f}% |",
        f"| fixed sample (test examples 0-{FIXED_SAMPLE - 1}) | {FIXED_SAMPLE} | {100 * sample:.1f}% |",
        "",
        "Per question type on the test split: " + ", ".join(f"{t} {100 * a:.1f}%" for t, a in test["per_type"].items()) + ".",
        "",
        f"Measured with torch {torch.__version__} on {platform.machine()}.",
        "",
    ]
    (checkpoint / "README.md").write_text("\n".join(lines))
    return {"test": test, "fixed_sample_accuracy": sample}


def _run_lines(number: int, run: dict) -> list[str]:
    origin = "on from the previous run's checkpoint" if run.get("init") else "from scratch"
    lines = [f"{number}. {origin}, seed {run['seed']}, on {run.get('machine', 'a 2-core CPU')}:"]
    vision = run.get("vision_pretraining")
    if vision:
        lines.append(
            f"   - phase one (vision tower): {vision['steps']} steps of {vision['batch_size']} examples, peak lr {vision['lr']},"
            f" {vision['train_seconds'] / 60:.0f} minutes; shape accuracy on object patches"
            f" {vision['history'][-1]['object_shape_accuracy']:.1%} over its last 25 steps"
        )
    titles = (
        ("sampled", "phase two (objects and sampled background)"),
        ("whole", "phase three (every patch)"),
        ("place", "phase four (where the named objects lie; every other example a position question)"),
    )
    for name, title in titles:
        phase = run.get(name)
        if not phase:
            continue
        background = f", up to {phase['background_patches']} background patches" if phase["background_patches"] is not None else ""
        validation = [h for h in phase["history"] if "validation_accuracy" in h]
        lines.append(
            f"   - {title}: {phase['steps']} steps of {phase['batch_size']} examples{background}, peak lr {phase['lr']},"
            f" {phase['warmup']} warm-up steps, {phase['train_seconds'] / 60:.0f} minutes; validation accuracy "
            + ", ".join(f"{h['validation_accuracy']:.1%} at step {h['step']}" for h in validation)
        )
    return lines
