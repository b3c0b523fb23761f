"""The three serving stages as plain Python objects, and the in-process pipeline that chains them.

The same stage objects run in one process (embedded mode, tests) and behind gRPC services.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from dartserve.kv.cache import RaggedKVCache
from dartserve.models import EncodedPrompt, ModelAdapter, PrefillResult, SamplingConfig, decode, load_adapter, prefill
from dartserve.models.decode import check_room
from dartserve.pruning.config import PruningConfig
from dartserve.timing import stopwatch


class VisionStage:
    """Images and a prompt in, projected vision tokens placed in the prompt out."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter

    def encode(
        self, images: list[Image.Image], prompt: str | list[dict], known: list[torch.Tensor | None] | None = None
    ) -> EncodedPrompt:
        """``prompt``: a question, or a conversation (``models.base.chat_messages``). ``known``:
        projected tokens of some images from an earlier encoding, which are not encoded again."""
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list of PIL images, got {type(images).__name__}")
        for image in images:
            if not isinstance(image, Image.Image):
                raise ValueError(f"images must be PIL images, got {type(image).__name__}")
        return self.adapter.encode([image.convert("RGB") for image in images], prompt, known)


class PrunerStage:
    """Prefill with pruning at layer K: encoded requests in, a ragged KV cache and first logits out."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter

    def prefill(self, requests: list[EncodedPrompt], pruning: PruningConfig) -> PrefillResult:
        return prefill(self.adapter, requests, pruning)


class GeneratorStage:
    """Decoding from a ragged KV cache."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter

    def decode(self, cache: RaggedKVCache, logits: torch.Tensor, samplings: list[SamplingConfig]) -> list[list[int]]:
        return decode(self.adapter, cache, logits, samplings)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.adapter.processor.tokenizer.decode(token_ids, skip_special_tokens=True)


@dataclass
class GenerationStats:
    prompt_tokens: int
    vision_tokens: int
    vision_tokens_kept: int
    new_tokens: int
    kv_bytes: int
    cached_tokens: list[int]  # per layer group: below K, and from K on when pruned
    vision_ms: float
    # A batch shares one prefill and one decode loop: these three are the batch's.
    prefill_ms: float
    selection_ms: float
    decode_ms: float


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    kept_positions: list[int]  # sequence indices of the vision tokens kept at layer K
    stats: GenerationStats
    cache: RaggedKVCache = field(repr=False)


@dataclass
class Request:
    images: list[Image.Image]
    prompt: str | list[dict]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


class Engine:
    """A loaded model and its three stages."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.vision = VisionStage(adapter)
        self.pruner = PrunerStage(adapter)
        self.generator = GeneratorStage(adapter)

    @classmethod
    def load(cls, model: str, device: str = "cpu", dtype: torch.dtype | None = None) -> Engine:
        return cls(load_adapter(model, device=device, dtype=dtype))

    def generate(
        self,
        images: list[Image.Image],
        prompt: str | list[dict],
        pruning: PruningConfig | None = None,
        sampling: SamplingConfig | None = None,
    ) -> GenerationResult:
        if sampling is not None and not isinstance(sampling, SamplingConfig):
            raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        request = Request(images, prompt, sampling or SamplingConfig())
        return self.generate_batch([request], pruning)[0]

    def generate_batch(self, requests: list[Request], pruning: PruningConfig | None = None) -> list[GenerationResult]:
        """Runs several requests through one prefill and one decode loop; each is pruned on its own."""
        if pruning is not None and not isinstance(pruning, PruningConfig):
            raise ValueError(f"pruning must be a PruningConfig, got {type(pruning).__name__}")
        pruning = pruning or PruningConfig(method="none")
        device = self.adapter.device
        vision_s: list[float] = []
        encoded = []
        for request in requests:
            with stopwatch(device, vision_s):
                encoded.append(self.vision.encode(request.images, request.prompt))
            check_room(self.adapter, int(encoded[-1].positions.max()) + 1, request.sampling)
        prefill_s: list[float] = []
        with stopwatch(device, prefill_s):
            result = self.pruner.prefill(encoded, pruning)
        decode_s: list[float] = []
        with stopwatch(device, decode_s):
            outputs = self.generator.decode(result.cache, result.logits, [r.sampling for r in requests])
        results = []
        for b, (request, tokens) in enumerate(zip(encoded, outputs)):
            cache = result.cache.select(b)
            stats = GenerationStats(
                prompt_tokens=len(request.input_ids),
                vision_tokens=request.num_vision_tokens,
                vision_tokens_kept=len(result.kept_positions[b]),
                new_tokens=len(tokens),
                kv_bytes=cache.nbytes(),
                cached_tokens=cache.kept_tokens(),
                vision_ms=vision_s[b] * 1e3,
                prefill_ms=prefill_s[0] * 1e3,
                selection_ms=result.selection_s * 1e3,
                decode_ms=decode_s[0] * 1e3,
            )
            results.append(
                GenerationResult(
                    self.generator.detokenize(tokens), tokens, result.kept_positions[b].tolist(), stats, cache
                )
            )
        return results
