"""The demo checkpoint's model card: its training settings and its measured accuracy."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from dartserve.demo.data import QUESTION_TYPES, conversation, describe_examples, example
from dartserve.demo.guidance import GUIDED_LAYER
from dartserve.demo.measure import answer_conversations, answers_right, conversation_accuracy, describe_accuracy
from dartserve.demo.train import OBJECT_WEIGHT
from dartserve.engine import Engine
from dartserve.evaluation import DESCRIPTIONS, SPLIT_SIZES
from dartserve.pruning import PruningConfig
from dartserve.pruning.config import DEFAULT_PRUNING

# The first test questions, description requests and conversations: the tests re-check the model on exactly these.
FIXED_SAMPLE = 100
FIXED_DESCRIPTIONS = 20
FIXED_CONVERSATIONS = 20
CONVERSATIONS = 200


def measure(checkpoint: Path) -> dict:
    """Every figure of the card, on the test split."""
    engine = Engine.load(str(checkpoint))
    none, served = PruningConfig(method="none"), PruningConfig(**DEFAULT_PRUNING)
    started = time.time()
    questions = [example("test", i) for i in range(SPLIT_SIZES["test"])]
    right = answers_right(engine, questions, none)
    conversations = [conversation("test", i) for i in range(CONVERSATIONS)]
    talks = {}
    for name, pruning in (("unpruned", none), ("served", served)):
        for continued in (True, False):
            answers = answer_conversations(engine, conversations, pruning, continued)
            talks[f"{name} {'continued' if continued else 'resent'}"] = {
                "all": conversation_accuracy(conversations, answers),
                "fixed_sample": conversation_accuracy(conversations[:FIXED_CONVERSATIONS], answers[:FIXED_CONVERSATIONS]),
            }
    descriptions = describe_examples("test", DESCRIPTIONS)
    return {
        "questions": len(questions),
        "accuracy": _share(right),
        "fixed_sample": _share(right[:FIXED_SAMPLE]),
        "per_type": {t: _share([r for r, q in zip(right, questions) if q.question_type == t]) for t in QUESTION_TYPES},
        "per_backdrop": {
            f"{shade}, {'textured' if textured else 'uniform'}": _share([r for r, q in zip(right, questions) if (q.backdrop.shade, q.backdrop.textured) == (shade, textured)])
            for shade in ("dark", "mid", "light")
            for textured in (False, True)
        },
        "conversations": len(conversations),
        "turns": sum(len(c.turns) for c in conversations),
        "talks": talks,
        "descriptions": len(descriptions),
        "describe": {name: describe_accuracy(engine, descriptions, pruning) for name, pruning in (("unpruned", none), ("served", served))},
        "describe_fixed_sample": describe_accuracy(engine, descriptions[:FIXED_DESCRIPTIONS], none),
        "measure_seconds": round(time.time() - started),
    }


def write_card(checkpoint: Path) -> dict:
    """Measures the checkpoint on the test split and writes ``README.md`` beside it."""
    figures = measure(checkpoint)
    training = json.loads((checkpoint / "training.json").read_text())
    config = json.loads((checkpoint / "config.json").read_text())
    text_config, vision_config = config["text_config"], config["vision_config"]
    parameters = sum(t.numel() for t in _tensors(checkpoint))
    talks = figures["talks"]
    served = f"{DEFAULT_PRUNING['method']} at layer {DEFAULT_PRUNING['layer']}, {round(576 * DEFAULT_PRUNING['ratio'])} of 576 vision tokens"
    lines = [
        "# dartserve demo model",
        "",
        "A `LlavaForConditionalGeneration` trained from scratch on dartserve's synthetic visual",
        "question-answering task (`dartserve/demo/data.py`). It holds a conversation about an image",
        "of small objects (336 x 336, 576 vision tokens, as LLaVA-1.5) on a grey background, dark to",
        "light, uniform or softly textured: it answers questions about their colour, shape, number,",
        "presence and relative position in one word, and describes the image in one sentence that names",
        'every object in reading order ("a red circle at the top left and a blue square at the bottom',
        'right."). It knows only the task\'s words.',
        "",
        "## Architecture",
        "",
        f"- vision tower: CLIP, {vision_config['num_hidden_layers']} layers, width {vision_config['hidden_size']}, patch 14, 336 px, last layer's patch tokens",
        "- projector: LLaVA's two-layer MLP (GELU)",
        f"- language model: Llama, {text_config['num_hidden_layers']} layers, width {text_config['hidden_size']}, {text_config['num_attention_heads']} heads, tied embeddings",
        f"- {parameters / 1e6:.2f} M parameters, float32; word-level tokenizer of {text_config['vocab_size']} tokens",
        "- prompt: LLaVA-1.5's, `USER: <image>\\nQUESTION ASSISTANT: ANSWER</s>USER: QUESTION ASSISTANT:`",
        "",
        "## Training (`dartserve train-demo`)",
        "",
        *[line for number, run in enumerate(training.get("earlier", []) + [training], start=1) for line in _run_lines(number, run)],
        "",
        "Every sample is a conversation of one to four turns about one image, each question of any of the",
        "six types (a description at most once); the loss is on every answer's tokens and `</s>`. Every",
        "phase: AdamW (betas 0.9, 0.98), warm-up then cosine decay to 10% of the peak, weight decay 0.01,",
        "gradient clip 1.0, fresh images. Phase one trains the vision tower alone through probes that name",
        "the shape and colour under each patch, the cell of the 3 x 3 grid that object lies in (object",
        f"patches weigh {OBJECT_WEIGHT:g} times the background) and where the patch lies. Phases two and three keep the vision",
        f"tower fixed and train the projector and the language model on the answers, plus {training['aux_weight']} x: the same",
        "probes on the projected tokens and the object count from their mean; a probe on each asking token",
        f"that names its question's shapes and colours; the attention of two heads of layer {GUIDED_LAYER} pulled to the",
        "objects a token needs (from a question's last token, the objects it names; in a description, the",
        "object each word is about); and the place of each vision token in those heads' values, and of the",
        "named objects after that layer (`dartserve/demo/guidance.py`). Phase two shows every object patch but",
        "only a random sample of the background, each at its place in the whole sequence, as after pruning,",
        "and asks about each image in several conversations in a row (`reuse`); phase three shows every",
        "patch. The probes are dropped after training. Validation is per-turn accuracy, teacher-forced,",
        "on 200 validation conversations, with every patch.",
        "",
        "## Accuracy (greedy; a short answer by exact match, a description by its object list)",
        "",
        "Unpruned, on the test split:",
        "",
        "| set | size | accuracy |",
        "|---|---|---|",
        f"| questions | {figures['questions']} | {_pct(figures['accuracy'])} |",
        f"| fixed sample (test questions 0-{FIXED_SAMPLE - 1}) | {FIXED_SAMPLE} | {_pct(figures['fixed_sample'])} |",
        f"| descriptions: the objects, colour and shape in reading order | {figures['descriptions']} | {_pct(figures['describe']['unpruned']['objects'])} |",
        f"| descriptions: and every coarse position | {figures['descriptions']} | {_pct(figures['describe']['unpruned']['places'])} |",
        f"| fixed sample of descriptions (test requests 0-{FIXED_DESCRIPTIONS - 1}), objects | {FIXED_DESCRIPTIONS} | {_pct(figures['describe_fixed_sample']['objects'])} |",
        f"| conversations: first turns | {figures['conversations']} | {_pct(talks['unpruned continued']['all']['first'])} |",
        f"| conversations: follow-up turns, continued from the cache | {figures['turns'] - figures['conversations']} | {_pct(talks['unpruned continued']['all']['follow_up'])} |",
        f"| conversations: follow-up turns, the history resent | {figures['turns'] - figures['conversations']} | {_pct(talks['unpruned resent']['all']['follow_up'])} |",
        f"| fixed sample of conversations (test conversations 0-{FIXED_CONVERSATIONS - 1}), follow-ups continued | – | {_pct(talks['unpruned continued']['fixed_sample']['follow_up'])} |",
        "",
        "Per question type: " + ", ".join(f"{t} {_pct(a)}" for t, a in figures["per_type"].items()) + ".",
        "By background: " + ", ".join(f"{b} {_pct(a)}" for b, a in figures["per_backdrop"].items()) + ".",
        "Follow-ups by type (continued): "
        + ", ".join(f"{k.split()[1]} {_pct(a)}" for k, a in talks["unpruned continued"]["all"].items() if k.startswith("follow_up ")) + ".",
        "",
        f"As served by default ({served}): descriptions {_pct(figures['describe']['served']['objects'])},",
        f"follow-up turns {_pct(talks['served continued']['all']['follow_up'])} continued and {_pct(talks['served resent']['all']['follow_up'])} with the history resent.",
        "",
        f"Measured with torch {torch.__version__} on {platform.machine()} in {figures['measure_seconds']} seconds.",
        "",
    ]
    (checkpoint / "README.md").write_text("\n".join(lines))
    (checkpoint / "card.json").write_text(json.dumps(figures, indent=2))
    return figures


def _share(right: list[bool]) -> float:
    return round(sum(right) / len(right), 4)


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def _tensors(checkpoint: Path):
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors").values()


def _run_lines(number: int, run: dict) -> list[str]:
    origin = "on from the previous run's checkpoint" if run.get("init") else "from scratch"
    lines = [f"{number}. {origin}, seed {run['seed']}, on {run.get('machine', 'a 2-core CPU')}:"]
    vision = run.get("vision_pretraining")
    if vision:
        last = vision["history"][-1:]  # none in a run shorter than one logging interval
        accuracy = f"; shape accuracy on object patches {last[0]['object_shape_accuracy']:.1%} over its last 25 steps" if last else ""
        lines.append(
            f"   - phase one (vision tower): {vision['steps']} steps of {vision['batch_size']} images, peak lr {vision['lr']},"
            f" {vision['train_seconds'] / 60:.0f} minutes{accuracy}"
        )
    titles = (("sampled", "phase two (objects and sampled background)"), ("whole", "phase three (every patch)"))
    for name, title in titles:
        phase = run.get(name)
        if not phase:
            continue
        background = f", up to {phase['background_patches']} background patches" if phase["background_patches"] is not None else ""
        images = f", images from the {_ordinal(phase['images_from'])} on" if phase.get("images_from") else ""
        validation = [h for h in phase["history"] if "validation" in h]
        lines.append(
            f"   - {title}: {phase['steps']} steps of {phase['batch_size']} conversations{background}{images}, each image in {phase['reuse']},"
            f" peak lr {phase['lr']}, {phase['warmup']} warm-up steps, {phase['train_seconds'] / 60:.0f} minutes; validation (first turns,"
            " follow-ups, descriptions) "
            + ", ".join(f"{_pct(h['validation']['first'])}, {_pct(h['validation']['follow_up'])}, {_pct(h['validation']['describe'])} at step {h['step']}" for h in validation)
        )
    return lines
