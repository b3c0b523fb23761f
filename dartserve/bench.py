"""``dartserve bench prefill``: prefill time of DART against no pruning on a LLaVA-1.5-shaped model.

The model has random weights (speed does not depend on them) and the shape of LLaVA-1.5's
language model scaled by ``--width`` and ``--depth``; the prompt is LLaVA-1.5's: a system and
user preamble, 576 vision tokens, a question. Every setting runs ``--runs`` times after a
warm-up, the settings taking turns, and reports medians; speed-ups are against the unpruned
prefill measured in the same run.
"""

from __future__ import annotations

import hashlib
import platform
import statistics
import tempfile
import uuid
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from dartserve.engine.core import EngineCore
from dartserve.engine.requests import CoreRequest, RequestOutput
from dartserve.models.base import EncodedPrompt
from dartserve.models.decode import SamplingConfig
from dartserve.models.llava import LlavaAdapter
from dartserve.models.loading import check_device
from dartserve.pruning.base import ImageSpan
from dartserve.pruning.config import PruningConfig
from dartserve.pruning.spatial import square_grid
from dartserve.timing import stopwatch

VISION_TOKENS = 576
TEXT_BEFORE = 35  # LLaVA-1.5's system prompt and "USER:" before the image
TEXT_AFTER = 40  # a typical question and "ASSISTANT:"
IMAGE_TOKEN = 32000


def bench_model(width: int, depth: int, device: str, dtype: torch.dtype) -> LlavaAdapter:
    check_device(device)
    heads = max(1, width // 128)
    if width % heads or (width // heads) % 2:  # RoPE rotates pairs of each head's channels
        raise ValueError(f"width {width} does not split into heads of an even size: use a multiple of 128, or an even width below it")
    text = LlamaConfig(
        hidden_size=width,
        intermediate_size=int(width * 2.6875),  # 11008 / 4096, LLaVA-1.5-7B's ratio
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32064,
        max_position_embeddings=4096,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=336, patch_size=14)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in place: a 7B model built in float32 on the CPU would not fit
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return LlavaAdapter(model, processor=None)


def servable_checkpoint(width: int, depth: int, cache: Path) -> Path:
    """A checkpoint a server can load: the demo model's tokenizer, processor and vision tower with
    a random LLaVA-shaped language model of ``width`` and ``depth`` (and a projector to it), saved
    once under ``cache``, in a folder named by the shape and the demo checkpoint it came from."""
    from dartserve.demo import CHECKPOINT
    from dartserve.models.loading import load_processor

    demo_id = hashlib.sha256((CHECKPOINT / "model.safetensors").read_bytes()).hexdigest()[:12]
    folder = Path(cache) / f"bench-{width}x{depth}-{demo_id}"
    if (folder / "model.safetensors").is_file():
        return folder
    demo = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT)
    text = bench_model(width, 1, "cpu", torch.float32).text.config  # LLaVA-1.5's shape, scaled
    text.num_hidden_layers = depth
    text.vocab_size = demo.config.text_config.vocab_size  # the demo's words: its tokenizer reads them
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(text, name, getattr(demo.config.text_config, name))
    config = LlavaConfig(text_config=text, vision_config=demo.config.vision_config, image_token_index=demo.config.image_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(demo.model.vision_tower.state_dict())
    model.generation_config = demo.generation_config
    staging = Path(tempfile.mkdtemp(prefix=folder.name, dir=folder.parent if folder.parent.exists() else None))
    model.save_pretrained(staging)
    load_processor(str(CHECKPOINT), "llava").save_pretrained(staging)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging.replace(folder)  # whole or not at all: a server never finds half a checkpoint
    return folder


def bench_prompt(adapter: LlavaAdapter, seed: int = 0) -> EncodedPrompt:
    """LLaVA-1.5's prompt layout with random text and vision tokens; ``seed`` picks them."""
    generator = torch.Generator().manual_seed(seed)
    text_ids = lambda n: torch.randint(3, 32000, (n,), generator=generator)  # noqa: E731
    ids = torch.cat([torch.tensor([1]), text_ids(TEXT_BEFORE - 1), torch.full((VISION_TOKENS,), IMAGE_TOKEN), text_ids(TEXT_AFTER)])
    width = adapter.text.config.hidden_size
    features = torch.randn(VISION_TOKENS, width, generator=generator) * 0.02
    span = ImageSpan(TEXT_BEFORE, VISION_TOKENS, square_grid(VISION_TOKENS))
    device = adapter.device
    return EncodedPrompt(ids.to(device), features.to(device, adapter.dtype), [span], torch.arange(len(ids), device=device)[None])


def prefill_once(core: EngineCore, prompt: EncodedPrompt, pruning: PruningConfig) -> tuple[float, RequestOutput]:
    """One prompt prefilled alone in a step of the engine core: its time and its one output."""
    core.add_request(CoreRequest(uuid.uuid4().hex, prompt, pruning, SamplingConfig(max_new_tokens=1), prefill_only=True))
    times: list[float] = []
    with stopwatch(core.adapter.device, times):
        (output,) = core.step()
    return times[0], output


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def ideal_speedup(layers: int, cut: int, full: int, kept: int) -> float:
    return layers * full / (cut * full + (layers - cut) * kept)


def run_prefill_bench(
    width: int = 1024,
    depth: int = 8,
    layer: int = 2,
    budgets: tuple[int, ...] = (192, 128, 64),
    methods: tuple[str, ...] = ("dart",),
    runs: int = 5,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[dict]:
    adapter = bench_model(width, depth, device, dtype)
    request = bench_prompt(adapter)
    full = len(request.input_ids)
    settings = [PruningConfig(method="none")] + [  # "none" in methods would repeat the baseline
        PruningConfig(method=m, budget=b, layer=layer) for m in methods if m != "none" for b in budgets
    ]
    machine = f"{device}: {torch.cuda.get_device_name() if device.startswith('cuda') else cpu_name()}, {torch.get_num_threads()} threads"
    core = EngineCore(adapter)
    # Settings take turns run by run, so drift in machine speed spreads over all of them alike.
    results = [prefill_once(core, request, config)[1] for config in settings]  # warm-up
    times: list[list[float]] = [[] for _ in settings]
    selections: list[list[float]] = [[] for _ in settings]
    for _ in range(runs):
        for i, config in enumerate(settings):
            seconds, results[i] = prefill_once(core, request, config)
            times[i].append(seconds)
            selections[i].append(results[i].state.metrics.selection_s)
    rows = []
    for config, result, run_times, run_selections in zip(settings, results, times, selections):
        kept = full - VISION_TOKENS + len(result.kept_positions)
        prefill_ms = statistics.median(run_times) * 1e3
        selection_ms = statistics.median(run_selections) * 1e3
        cut = config.layer if config.prunes else depth
        rows.append(
            {
                "method": config.method,
                "budget": len(result.kept_positions),
                "layer": config.layer if config.prunes else None,
                "prompt_tokens": full,
                "tokens_after_k": kept,
                "prefill_ms": round(prefill_ms, 3),
                "selection_ms": round(selection_ms, 3),
                "selection_share": round(selection_ms / prefill_ms, 5),
                "kv_bytes": result.cache.nbytes(),  # the prompt's cache, as a prefill leaves it
                "ideal_speedup": round(ideal_speedup(depth, cut, full, kept), 3),
                "runs": runs,
                "width": width,
                "depth": depth,
                "dtype": str(dtype).removeprefix("torch."),
                "machine": machine,
            }
        )
    baseline = rows[0]["prefill_ms"]
    for row in rows:
        row["speedup"] = round(baseline / row["prefill_ms"], 3)
        row["speedup_of_ideal"] = round(row["speedup"] / row["ideal_speedup"], 3)
    return rows
