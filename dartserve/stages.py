"""What each serving stage does with a request when the stages hand work over through a store.

The vision step leaves the encoded prompt in the store and answers with its key (a claim
check). The prefill step reads it, leaves the reduced KV cache and answers with a handle and
the first token. The decode step streams the rest of the answer from the handle and leaves
the longer cache under a new handle, from which the conversation's next turn continues by
prefilling only that turn's tokens. The gRPC services call these, over Redis.

The model work goes to the engine's loop (``Engine.loop``): the vision tower batches the
images of concurrent encodes, and prefills and decodes of concurrent calls share the core's
steps. A generator keeps each turn's blocks resident under its new handle, so a follow-up that
comes back to it continues from them; any other generator loads the cache from the store.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from PIL import Image

from dartserve.checks import MAX_PIXELS, SettingError
from dartserve.engine import Engine
from dartserve.engine.requests import Abandoned, CoreRequest, RequestOutput
from dartserve.kv import blob
from dartserve.kv.cache import RaggedKVCache
from dartserve.kv.codec import CacheMiss, decode, encode, read_header
from dartserve.kv.store import DEFAULT_TTL_S, KV_PREFIX, cache_key
from dartserve.models.base import EncodedPrompt, chat_messages
from dartserve.models.decode import SamplingConfig, check_room, finish_reason
from dartserve.pruning.base import Grid, ImageSpan
from dartserve.pruning.config import PruningConfig


MAX_ASPECT = 20
HEX_DIGITS = set("0123456789abcdef")
POLL_S = 0.05  # how often a waiting step asks whether its caller still waits


class StageMiss(Exception):
    """A claim check or KV handle whose value is gone or unusable: recompute, never guess."""


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decodes an image file, rejecting what is not one, is damaged, or is too large to decode."""
    if not isinstance(data, bytes) or not data:
        raise SettingError("an image must be non-empty file bytes", "image")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:  # checked before decoding: no decompression bombs
                raise SettingError(f"image is {width}x{height}, over the limit of {max_pixels} pixels", "image")
            # Processors scale the short side up to the model's size: a 1 x 16000 strip would
            # grow to hundreds of megapixels.
            if max(width, height) > MAX_ASPECT * min(width, height):
                raise SettingError(f"image is {width}x{height}; the long side may be at most {MAX_ASPECT} times the short one", "image")
            probe.load()
            return probe.convert("RGB")
    except Image.UnidentifiedImageError:
        raise SettingError("not a readable image: its format is not one PIL reads", "image") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise SettingError(f"not a readable image: {error}", "image") from None


def visible_text(engine: Engine, token_ids: list[int]) -> str:
    """The text of ``token_ids`` without a trailing half of a multi-byte character, which the
    next token completes: text shown so far is then always a prefix of the text to come."""
    return engine.generator.detokenize(token_ids).rstrip("\ufffd")


@dataclass
class Encoded:
    prompt_ref: str
    image_hashes: list[str]
    prompt_tokens: int
    vision_tokens: int
    images_cached: int
    encode_ms: float


@dataclass
class Prefilled:
    kv_handle: str
    first_token: int
    first_text: str
    finish_reason: str  # "stop" or "length" when the first token ends the answer, else ""
    prompt_tokens: int
    vision_tokens: int
    kept_vision_tokens: int
    kv_bytes: int
    prefill_ms: float
    selection_ms: float
    pruning: dict
    kv_store_ms: float  # writing the KV cache to the store


@dataclass
class Chunk:
    """Tokens of an answer as they come; the last chunk (``done``) names the new handle."""

    token_ids: list[int]
    text: str
    done: bool = False
    kv_handle: str = ""
    pending_token: int = 0
    finish_reason: str = ""
    prefill_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    kv_store_ms: float = 0.0  # reading the KV cache from the store and writing its new tail


class _Step:
    def __init__(self, engine: Engine, store, ttl_s: int = DEFAULT_TTL_S) -> None:
        self.engine = engine
        self.adapter = engine.adapter
        self.store = store
        self.ttl_s = ttl_s
        self.fingerprint = engine.adapter.fingerprint

    def _outputs(self, request: CoreRequest, wanted: Callable[[], bool] | None) -> Iterator[RequestOutput]:
        """The request's outputs from the engine core as they come. A caller that leaves (``wanted``
        turns false) aborts it, and so does closing the iterator: its blocks are freed at once."""
        stream = self.engine.loop.submit(request)
        try:
            while not stream.finished:
                try:
                    output = stream.get(timeout=POLL_S)
                except queue.Empty:
                    output = None
                if wanted is not None and not wanted():
                    raise Abandoned("the caller gave up: the engine stops its work") from None
                if output is None:
                    continue
                if output.error is not None:
                    raise output.error
                if output.finish_reason == "abort":
                    raise Abandoned("the engine stopped the request")
                yield output
        finally:
            stream.abort()


class VisionStep(_Step):
    def __init__(self, engine: Engine, store, ttl_s: int = DEFAULT_TTL_S, max_pixels: int = MAX_PIXELS) -> None:
        super().__init__(engine, store, ttl_s)
        self.max_pixels = max_pixels

    def encode(self, images: list[bytes], prompt: str | list[dict], wanted: Callable[[], bool] | None = None, cache_scope: str = "") -> Encoded:
        """``cache_scope``: whose images these are. An image's tokens are cached under its hash
        within its scope, so a caller can learn nothing (``images_cached``, the time taken) of
        the images another scope sent."""
        started = time.perf_counter()
        messages = chat_messages(prompt)
        decoded = [open_image(data, self.max_pixels) for data in images]  # checks them first
        hashes = [image_hash(data, cache_scope) for data in images]
        feature_keys = [feature_key(self.fingerprint, h) for h in hashes]
        # Image tokens found live on with the prompt that names them.
        known = [self._features(data) for data in self.store.get_values(feature_keys, refresh_ttl_s=self.ttl_s)]
        request = self.engine.vision.encode(decoded, messages, known, wanted)
        # One write: the image tokens that are new, and the prompt, which names them by key.
        writes = {}
        offset = 0
        for key, features, span in zip(feature_keys, known, request.spans):
            if features is None:
                image_tokens = request.image_features[offset : offset + span.length]
                writes[key] = blob.pack("features", self.fingerprint, {"features": image_tokens})
            offset += span.length
        identity = json.dumps({"model": self.fingerprint, "images": hashes, "messages": messages}, sort_keys=True)
        prompt_ref = "dartserve:prompt:" + hashlib.sha256(identity.encode()).hexdigest()
        writes[prompt_ref] = pack_prompt(request, hashes, feature_keys, self.fingerprint)
        self.store.set_values(writes, self.ttl_s)
        return Encoded(
            prompt_ref=prompt_ref,
            image_hashes=hashes,
            prompt_tokens=len(request.input_ids),
            vision_tokens=request.num_vision_tokens,
            images_cached=sum(f is not None for f in known),
            encode_ms=(time.perf_counter() - started) * 1e3,
        )

    def _features(self, data: bytes | None) -> torch.Tensor | None:
        if data is None:
            return None
        try:
            return blob.unpack(data, "features", self.fingerprint)[0]["features"]
        except CacheMiss:
            return None  # a damaged value is encoded again


class PrefillStep(_Step):
    def prefill(
        self, prompt_ref: str, pruning: PruningConfig, sampling: SamplingConfig, image_hashes: list[str] = (), wanted: Callable[[], bool] | None = None
    ) -> Prefilled:
        """``image_hashes``, the vision step's, let the prompt and its image tokens come in one
        read of the store; without them, or if they are not the prompt's, it takes two."""
        if not all(isinstance(h, str) and len(h) == 64 and set(h) <= HEX_DIGITS for h in image_hashes):
            raise ValueError("image_hashes must be the SHA-256 hex digests the vision step returned")
        keys = [feature_key(self.fingerprint, h) for h in image_hashes]
        data, *values = self.store.get_values([prompt_ref, *keys])
        if data is None:
            raise StageMiss(f"encoded prompt {prompt_ref} is not in the store (expired or evicted)")
        try:
            request, hashes = unpack_prompt(data, self.store, self.adapter, self.fingerprint, dict(zip(keys, values)))
        except CacheMiss as error:
            raise StageMiss(f"encoded prompt {prompt_ref} is unusable: {error}") from None
        core_request = CoreRequest(uuid.uuid4().hex, request, pruning, sampling, prefill_only=True)
        (output,) = self._outputs(core_request, wanted)
        token, state = output.tokens[0], output.state
        ids = request.input_ids.tolist()
        handle = cache_key(self.fingerprint, hashes, ids, pruning.to_dict())
        encoded = encode(output.cache, self.fingerprint)
        stored = time.perf_counter()
        self.store.put(handle, encoded, self.ttl_s)
        kv_store_ms = (time.perf_counter() - stored) * 1e3
        return Prefilled(
            kv_handle=handle,
            first_token=token,
            first_text=visible_text(self.engine, [token]),
            finish_reason=finish_reason(self.adapter, sampling, token, 1),
            prompt_tokens=len(ids),
            vision_tokens=request.num_vision_tokens,
            kept_vision_tokens=len(state.kept_positions),
            kv_bytes=encoded.nbytes,
            prefill_ms=state.metrics.prefill_s * 1e3,
            selection_ms=state.metrics.selection_s * 1e3,
            pruning=pruning.to_dict(),
            kv_store_ms=kv_store_ms,
        )


class DecodeStep(_Step):
    def generate(
        self, kv_handle: str, sampling: SamplingConfig, pending: int, question: str | None = None, wanted: Callable[[], bool] | None = None
    ) -> Iterator[Chunk]:
        """Streams an answer after ``pending``, the last picked token that is not in the cache.

        Without ``question``, ``pending`` is the prefill's first token, which the caller has
        already shown, and the answer goes on from it. With one, ``pending`` closes the previous
        answer, only the new turn is prefilled on top of the cache, and a new answer starts.
        The request joins the engine core's running batch, so concurrent answers share steps.
        """
        if question is not None and (not isinstance(question, str) or not question.strip()):
            raise ValueError("a follow-up question must be a non-empty string")
        if not isinstance(kv_handle, str) or not kv_handle.startswith(KV_PREFIX):
            raise ValueError(f"a KV handle starts with {KV_PREFIX!r}: use one a prefill or an answer returned")
        vocabulary = self.adapter.lm_head.out_features
        if not isinstance(pending, int) or not 0 <= pending < vocabulary:
            raise ValueError(f"the pending token must be a token id from 0 to {vocabulary - 1}, got {pending!r}")
        started = time.perf_counter()
        if question is None and finish_reason(self.adapter, sampling, pending, 1):
            yield Chunk([], "", done=True, kv_handle=kv_handle, pending_token=pending, finish_reason=finish_reason(self.adapter, sampling, pending, 1))
            return
        feed, answer = ((pending,), [pending]) if question is None else (tuple(self.adapter.turn_ids(pending, question)), [])
        new_handle = KV_PREFIX + hashlib.sha256(json.dumps([kv_handle, uuid.uuid4().hex]).encode()).hexdigest()
        request = CoreRequest(uuid.uuid4().hex, sampling=sampling, feed=feed, answer=tuple(answer), keep=new_handle, export_tail=True)
        kv_store_ms, outputs = 0.0, None
        resident = self.engine.loop.core.kv.resident.get(kv_handle)  # a hint: the core checks again
        if resident is not None:
            check_room(self.adapter, resident.next_position + len(feed) - len(answer), sampling)
            outputs = self._outputs(replace(request, parent=kv_handle), wanted)
            try:
                first = next(outputs)
            except LookupError:  # the blocks went between the look and the request
                outputs = None
        if outputs is None:
            cache, kv_store_ms = self._load(kv_handle)
            outputs = self._outputs(replace(request, cache=cache), wanted)
            first = next(outputs)
        shown = visible_text(self.engine, answer)  # what the caller has been shown already
        for output in itertools.chain([first], outputs):
            answer += output.tokens
            text = visible_text(self.engine, answer)
            yield Chunk(output.tokens, text[len(shown) :])
            shown = text
        full = self.engine.generator.detokenize(answer)
        if full != shown:  # what was held back for a character that never completed
            yield Chunk([], full[len(shown) :])
        decoded_at, load_ms = time.perf_counter(), kv_store_ms
        state = output.state
        # The cache now holds every answer token but the last, which stays pending. Only the
        # tokens added here are written, as a tail that names its parent: a turn's KV cache is
        # never copied again.
        tail = encode(output.cache, self.fingerprint, meta={"parent": kv_handle})
        stored = time.perf_counter()
        self.store.put(new_handle, tail, self.ttl_s)
        kv_store_ms += (time.perf_counter() - stored) * 1e3
        prefill_ms = state.metrics.prefill_s * 1e3 if question is not None else 0.0
        yield Chunk(
            [],
            "",
            done=True,
            kv_handle=new_handle,
            pending_token=answer[-1],
            finish_reason=state.finish_reason,
            prefill_tokens=len(feed) if question is not None else 0,
            prefill_ms=prefill_ms,
            decode_ms=(decoded_at - started) * 1e3 - prefill_ms - load_ms,
            kv_store_ms=kv_store_ms,
        )

    def _load(self, kv_handle: str) -> tuple[RaggedKVCache, float]:
        """The cache behind a handle (a prefill's cache, or a tail that names its parent), and
        the milliseconds spent reading the store."""
        parts, store_s = [], 0.0
        handle = kv_handle
        while handle:
            started = time.perf_counter()
            # A conversation that is read lives on: its earlier turns expire with its latest.
            encoded = self.store.get(handle, self.adapter.num_layers, refresh_ttl_s=self.ttl_s)
            store_s += time.perf_counter() - started
            if encoded is None:
                raise StageMiss(f"KV cache {handle} is not in the store (expired or evicted)")
            try:
                parts.append(decode(encoded, self.fingerprint, self.adapter.device))
                handle = read_header(encoded.manifest, self.fingerprint)["meta"].get("parent")
            except (CacheMiss, TypeError, AttributeError) as error:
                raise StageMiss(f"KV cache {handle} is unusable: {error}") from None
        return RaggedKVCache.concat(parts[::-1]), store_s * 1e3


def pack_prompt(request: EncodedPrompt, image_hashes: list[str], feature_keys: list[str], fingerprint: str) -> bytes:
    """The prompt without its image tokens, which stay under their own keys."""
    spans = [{"start": s.start, "length": s.length, "grids": [[g.offset, g.h, g.w, g.stride] for g in s.grids]} for s in request.spans]
    tensors = {"input_ids": request.input_ids, "positions": request.positions}
    return blob.pack("prompt", fingerprint, tensors, {"spans": spans, "image_hashes": image_hashes, "feature_keys": feature_keys})


def image_hash(data: bytes, cache_scope: str = "") -> str:
    """The SHA-256 of an image file, of the scope and the file when there is a scope."""
    return hashlib.sha256(cache_scope.encode() + b"\0" + data if cache_scope else data).hexdigest()


def feature_key(fingerprint: str, image_hash: str) -> str:
    return f"dartserve:vision:{fingerprint}:{image_hash}"


def unpack_prompt(data: bytes, store, adapter, fingerprint: str, read: dict[str, bytes | None]) -> tuple[EncodedPrompt, list[str]]:
    """The encoded prompt with its image tokens, taken from ``read`` (image tokens already read
    with it) when it holds all of them, else read from ``store``; ``CacheMiss`` if any part is
    gone or damaged."""
    tensors, meta = blob.unpack(data, "prompt", fingerprint, adapter.device)
    try:
        spans = [ImageSpan(s["start"], s["length"], tuple(Grid(*g) for g in s["grids"])) for s in meta["spans"]]
        keys = list(meta["feature_keys"])
        values = [read[k] for k in keys] if set(keys) <= read.keys() else store.get_values(keys)
        hashes = list(meta["image_hashes"])
    except (KeyError, TypeError) as error:
        raise CacheMiss(f"malformed prompt value: {error}") from None
    if any(v is None for v in values):
        raise CacheMiss("an image's tokens are no longer in the store")
    features = [blob.unpack(v, "features", fingerprint, adapter.device)[0]["features"] for v in values]
    hidden = adapter.text.config.hidden_size
    stacked = torch.cat(features) if features else torch.empty(0, hidden, dtype=adapter.dtype, device=adapter.device)
    return EncodedPrompt(tensors["input_ids"], stacked, spans, tensors["positions"]), hashes
