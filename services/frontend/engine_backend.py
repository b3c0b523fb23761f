"""The engine in this process (``dartserve serve``, a worker with ``--local``): nothing is
serialized on the way. Images are decoded and encoded by the engine's vision tower, the prompt
goes to the engine core as tensors, and a conversation's next turn continues from the KV blocks
its last turn kept in the core's pool.

Image tokens are cached in memory, by the image's content and whose it is (the tenant), with
the image's file, so that a conversation whose blocks the pool released can be answered again
from its text: the whole conversation is prefilled afresh.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator

import torch

from dartserve.engine import Engine
from dartserve.engine.requests import CoreRequest, RequestOutput
from dartserve.models.base import EncodedPrompt
from dartserve.pruning.config import PruningConfig
from dartserve.stages import open_image, visible_text
from services.frontend.inputs import ApiError
from services.frontend.pipeline import Delta, Final, Question


class ImageCache:
    """Image files and their tokens by key, least recently used going first past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self._entries: OrderedDict[str, tuple[bytes, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[bytes, torch.Tensor] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, data: bytes, features: torch.Tensor) -> None:
        size = len(data) + features.nbytes
        if size > self.max_bytes:
            return  # one that would empty the cache alone is not kept
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (data, features)
            self.used += size
            while self.used > self.max_bytes:
                _, (old, tokens) = self._entries.popitem(last=False)
                self.used -= len(old) + tokens.nbytes


def image_key(data: bytes, tenant: str) -> str:
    """An image's key within its tenant: a caller learns nothing of another tenant's images."""
    return hashlib.blake2b(tenant.encode() + b"\0" + data, digest_size=20).hexdigest()


class EngineBackend:
    def __init__(self, engine: Engine, max_pixels: int, cache_bytes: int) -> None:
        self.engine = engine
        self.max_pixels = max_pixels
        self.images = ImageCache(cache_bytes)

    def readiness(self) -> dict[str, bool]:
        return {"engine": True}

    def close(self) -> None:
        self.engine.loop.stop()

    def answer(self, question: Question, previous: dict | None = None, stream: bool = True) -> Iterator[Delta | Final]:
        """Streams the answer's text, then a ``Final`` whose record names the blocks its turn
        kept; with ``previous``, only the new turn is prefilled, on top of those blocks."""
        started = time.perf_counter()
        if previous is not None:
            events = self._follow_up(question, previous, started)
            if events is not None:
                yield from events
                return
            if not question.images:  # the blocks are gone: the conversation again, from its text
                question = self._from_record(question, previous)
        yield from self._first_turn(question, started)

    def _first_turn(self, question: Question, started: float) -> Iterator[Delta | Final]:
        keys = [image_key(data, question.tenant) for data in question.images]
        decoded = [open_image(data, self.max_pixels) for data in question.images]  # checks them first
        cached = [self.images.get(key) for key in keys]
        prompt = self.engine.vision.encode(decoded, question.messages, [c[1] if c else None for c in cached])
        for key, data, span, entry in zip(keys, question.images, _spans(prompt), cached):
            if entry is None:
                self.images.put(key, data, prompt.image_features[span].clone())
        encode_ms = (time.perf_counter() - started) * 1e3
        kept = uuid.uuid4().hex
        request = CoreRequest(uuid.uuid4().hex, prompt, question.pruning, question.sampling, keep=kept)
        tokens, text, state, ttft_ms = yield from self._stream(self._deltas(request), started)
        record = {
            "kv_handle": kept,
            "pending_token": tokens[-1],
            "messages": question.messages + [{"role": "assistant", "content": text}],
            "context_tokens": len(prompt.input_ids) + len(tokens) - 1,
            "vision_tokens": prompt.num_vision_tokens,
            "kept_vision_tokens": len(state.kept_positions),
            "pruning": question.pruning.to_dict(),
            "images": keys,
        }
        usage = {
            "prompt_tokens": len(prompt.input_ids),
            "vision_tokens": prompt.num_vision_tokens,
            "kept_vision_tokens": len(state.kept_positions),
            "completion_tokens": len(tokens),
            "prefill_tokens": len(prompt.input_ids),
            "cached_images": sum(c is not None for c in cached),
            "kv_bytes": self._kv_bytes(state),
        }
        yield self._final(text, tokens, state, record, usage, started, encode_ms, ttft_ms, question.pruning, prompt.num_vision_tokens)

    def _follow_up(self, question: Question, previous: dict, started: float) -> Iterator[Delta | Final] | None:
        """The next turn from the blocks the last one kept, or None when the pool released them."""
        if previous["kv_handle"] not in self.engine.loop.core.kv.resident:
            return None
        turn = self.engine.adapter.turn_ids(previous["pending_token"], question.messages[-1]["content"])
        kept = uuid.uuid4().hex
        request = CoreRequest(uuid.uuid4().hex, parent=previous["kv_handle"], feed=tuple(turn), sampling=question.sampling, keep=kept)
        events = self._deltas(request)
        try:
            first = next(events)
        except LookupError:  # released between the look and the request
            return None
        return self._continue(itertools.chain([first], events), turn, question, previous, kept, started)

    def _continue(self, events, turn, question, previous, kept, started) -> Iterator[Delta | Final]:
        tokens, text, state, ttft_ms = yield from self._stream(events, started)
        context = previous["context_tokens"] + len(turn)
        record = dict(
            previous,
            kv_handle=kept,
            pending_token=tokens[-1],
            messages=question.messages + [{"role": "assistant", "content": text}],
            context_tokens=context + len(tokens) - 1,
        )
        usage = {
            "prompt_tokens": context,
            "vision_tokens": previous["vision_tokens"],
            "kept_vision_tokens": previous["kept_vision_tokens"],
            "completion_tokens": len(tokens),
            "prefill_tokens": len(turn),
            "cached_images": 0,
        }
        pruning = PruningConfig.from_dict(previous["pruning"])
        yield self._final(text, tokens, state, record, usage, started, 0.0, ttft_ms, pruning, previous["vision_tokens"])

    def _from_record(self, question: Question, previous: dict) -> Question:
        """The conversation as a first turn, with the images its record names, while they are
        cached; a 503 when they are not: the conversation must start again."""
        entries = [self.images.get(key) for key in previous.get("images", [])]
        if not entries or any(e is None for e in entries):
            raise ApiError(503, "the conversation's KV cache was released; start a new conversation with the image", "conversation_id", kind="service_unavailable")
        return Question([e[0] for e in entries], question.messages, PruningConfig.from_dict(previous["pruning"]), question.sampling, question.tenant)

    @staticmethod
    def _stream(events, started: float):
        """Yields the answer's deltas; returns its tokens, its text, its request's state and the
        time to its first token."""
        tokens, texts, output, ttft_ms = [], [], None, 0.0
        for output, new, delta in events:
            if not tokens:
                ttft_ms = (time.perf_counter() - started) * 1e3
            tokens += new
            if delta:
                texts.append(delta)
                yield Delta(delta)
        return tokens, "".join(texts).strip(), output.state, ttft_ms

    def _deltas(self, request: CoreRequest) -> Iterator[tuple[RequestOutput, list[int], str]]:
        """Each output of the request with its tokens and the text they add; closing it aborts
        the request."""
        stream = self.engine.loop.submit(request)
        answer, shown = [], ""
        try:
            for output in stream:
                if output.error is not None:
                    raise output.error
                answer += output.tokens
                # The last output shows what was held back for a character that never completed.
                text = self.engine.generator.detokenize(answer) if output.finished else visible_text(self.engine, answer)
                yield output, output.tokens, text[len(shown) :]
                shown = text
        finally:
            stream.abort()

    def _kv_bytes(self, state) -> int:
        layout = state.layout
        return sum(layout.layer_length(i) for i in range(layout.num_layers)) * self.engine.loop.core.pool.slot_bytes

    def _final(self, text, tokens, state, record, usage, started, encode_ms, ttft_ms, pruning: PruningConfig, vision_tokens: int) -> Final:
        times = state.metrics
        timings = {
            "encode_ms": encode_ms,
            "prefill_ms": times.prefill_s * 1e3,
            "selection_ms": times.selection_s * 1e3,
            "ttft_ms": ttft_ms,
            "decode_ms": (times.finished - times.first_token) * 1e3,
            "kv_store_ms": 0.0,
            "total_ms": (time.perf_counter() - started) * 1e3,
        }
        return Final(text, tokens, state.finish_reason, record, usage, timings, pruning.applied(vision_tokens))


def _spans(prompt: EncodedPrompt) -> list[slice]:
    """Each image's rows of the prompt's image features."""
    spans, offset = [], 0
    for span in prompt.spans:
        spans.append(slice(offset, offset + span.length))
        offset += span.length
    return spans

