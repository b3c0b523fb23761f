"""A loaded model: its vision stage, the engine core that prefills and decodes every request,
and the batch API over them."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from dartserve.engine.core import CoreConfig, EngineCore
from dartserve.engine.loop import EngineLoop, RequestStream
from dartserve.engine.requests import CoreRequest
from dartserve.kv.cache import RaggedKVCache
from dartserve.models import EncodedPrompt, ModelAdapter, SamplingConfig, load_adapter
from dartserve.models.base import PARTS
from dartserve.pruning.config import PruningConfig
from dartserve.timing import stopwatch


class VisionStage:
    """Images and a prompt in, projected vision tokens placed in the prompt out. ``tower`` runs
    the vision tower on images' inputs (``ModelAdapter.image_features_many``, or the engine
    loop's, which batches concurrent callers)."""

    def __init__(self, adapter: ModelAdapter, tower: Callable[[list[dict]], list[torch.Tensor]] | None = None) -> None:
        self.adapter = adapter
        self.tower = tower

    def encode(
        self, images: list[Image.Image], prompt: str | list[dict], known: list[torch.Tensor | None] | None = None, wanted: Callable[[], bool] | None = None
    ) -> EncodedPrompt:
        """``prompt``: a question, or a conversation (``models.base.chat_messages``). ``known``:
        projected tokens of some images from an earlier encoding, which are not encoded again.
        ``wanted`` says whether the caller still waits, for a tower that queues its work."""
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list of PIL images, got {type(images).__name__}")
        for image in images:
            if not isinstance(image, Image.Image):
                raise ValueError(f"images must be PIL images, got {type(image).__name__}")
        tower = self.tower if self.tower is None or wanted is None else (lambda inputs: self.tower(inputs, wanted))
        return self.adapter.encode([image.convert("RGB") for image in images], prompt, known, tower)


class GeneratorStage:
    """Token ids to text."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter

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
    # The steps a request runs in are shared with the others of its batch: these are those steps'.
    prefill_ms: float
    selection_ms: float
    decode_ms: float


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    kept_positions: list[int]  # sequence indices of the vision tokens kept at layer K
    stats: GenerationStats
    cache: RaggedKVCache | None = field(repr=False)  # with ``return_cache``


@dataclass
class Request:
    images: list[Image.Image]
    prompt: str | list[dict]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


class Engine:
    """A loaded model, its three stages, and the engine core that runs every request."""

    def __init__(self, adapter: ModelAdapter, core_config: CoreConfig | None = None) -> None:
        self.adapter = adapter
        self.vision = VisionStage(adapter, tower=lambda images, wanted=None: self.loop.encode_images(images, wanted))
        self.generator = GeneratorStage(adapter)
        self.core_config = core_config or CoreConfig()
        self._loop: EngineLoop | None = None
        self._loop_lock = threading.Lock()

    @classmethod
    def load(cls, model: str, device: str = "cpu", dtype: torch.dtype | None = None, core_config: CoreConfig | None = None, parts: tuple[str, ...] = PARTS) -> Engine:
        """``parts``: the parts of the model this process runs (``ModelAdapter.keep_only``)."""
        return cls(load_adapter(model, device=device, dtype=dtype, parts=parts), core_config)

    @property
    def loop(self) -> EngineLoop:
        """The engine core and the vision tower in one thread, started on first use: one per engine,
        shared by every caller (a process that loaded only one of them runs only that one)."""
        with self._loop_lock:
            if self._loop is None:
                core = EngineCore(self.adapter, self.core_config) if "language" in self.adapter.parts else None
                tower = self.adapter.image_features_many if "vision" in self.adapter.parts else None
                self._loop = EngineLoop(core, tower)
            return self._loop

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

    def generate_batch(self, requests: list[Request], pruning: PruningConfig | None = None, return_cache: bool = False) -> list[GenerationResult]:
        """Runs the requests through the engine core together; each is pruned on its own, and
        each gives the same tokens it gives alone. ``return_cache``: each result carries its
        request's KV cache (prompt and every answer token but the last)."""
        if pruning is not None and not isinstance(pruning, PruningConfig):
            raise ValueError(f"pruning must be a PruningConfig, got {type(pruning).__name__}")
        pruning = pruning or PruningConfig(method="none")
        vision_s: list[float] = []
        submitted = []
        for request in requests:
            with stopwatch(self.adapter.device, vision_s):
                encoded = self.vision.encode(request.images, request.prompt)
            core_request = CoreRequest(uuid.uuid4().hex, encoded, pruning, request.sampling, export_cache=return_cache)
            self.loop.core.check(core_request)
            submitted.append(core_request)
        streams = [self.loop.submit(r) for r in submitted]
        return [self._result(stream, ms * 1e3) for stream, ms in zip(streams, vision_s)]

    def _result(self, stream: RequestStream, vision_ms: float) -> GenerationResult:
        tokens, kept = [], []
        for output in stream:
            if output.error is not None:
                raise output.error
            tokens += output.tokens
            kept = output.kept_positions if output.kept_positions is not None else kept
        state = output.state
        prompt, metrics = state.request.prompt, state.metrics
        layout = state.layout
        stats = GenerationStats(
            prompt_tokens=len(prompt.input_ids),
            vision_tokens=prompt.num_vision_tokens,
            vision_tokens_kept=len(kept),
            new_tokens=len(tokens),
            kv_bytes=sum(layout.layer_length(i) for i in range(layout.num_layers)) * self.loop.core.pool.slot_bytes,
            cached_tokens=list(layout.lengths),
            vision_ms=vision_ms,
            prefill_ms=metrics.prefill_s * 1e3,
            selection_ms=metrics.selection_s * 1e3,
            decode_ms=(metrics.finished - metrics.first_token) * 1e3,
        )
        return GenerationResult(self.generator.detokenize(tokens), tokens, kept, stats, output.cache)
