"""A question, the events of its answer, and the answer through the three stages over a store
(``staged_answer``: claim checks and KV handles), which the gRPC backend runs."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

from dartserve.models.decode import SamplingConfig
from dartserve.pruning.config import PruningConfig
from dartserve.stages import StageMiss
from services.frontend.errors import Unavailable
from services.frontend.inputs import ApiError


@dataclass
class Question:
    images: list[bytes]
    messages: list[dict]  # the conversation, ending with the user's question
    pruning: PruningConfig
    sampling: SamplingConfig
    tenant: str = ""  # whose question: cached image tokens are shared within a tenant only


@dataclass
class Delta:
    text: str


@dataclass
class Final:
    text: str
    token_ids: list[int]
    finish_reason: str
    record: dict  # what the conversation's next turn continues from
    usage: dict
    timings: dict
    pruning: dict  # as applied: the budget in tokens, also where the request gave a ratio


def staged_answer(backend, question: Question, previous: dict | None = None, stream: bool = True) -> Iterator[Delta | Final]:
    """Streams the answer's text, then a ``Final``. With ``previous`` (a conversation record),
    only the new turn is prefilled, on top of the cached conversation. Without ``stream``, the
    decoded text may come in one delta, just before the ``Final``."""
    started = time.perf_counter()
    if previous is not None:
        yield from _follow_up(backend, question, previous, started, stream)
        return
    encoded, prefilled = _encode_and_prefill(backend, question)
    ttft_ms = (time.perf_counter() - started) * 1e3
    if prefilled.first_text:  # a token may show no text until the next completes its character
        yield Delta(prefilled.first_text)
    tokens, texts, last = [prefilled.first_token], [prefilled.first_text], None
    if not prefilled.finish_reason:
        chunks = backend.generate(prefilled.kv_handle, question.sampling, prefilled.first_token, stream=stream)
        try:
            first = next(chunks)
        except StageMiss:  # the KV cache went between prefill and decode: prefill again, once
            encoded, prefilled = _encode_and_prefill(backend, question)
            if prefilled.first_token != tokens[0]:  # sampled, or another replica's hardware
                if stream and texts[0]:  # shown already: no answer can go on from another token
                    raise Unavailable("the prefill picked another first token when run again; ask again") from None
                tokens, texts = [prefilled.first_token], [prefilled.first_text]
                if prefilled.first_text:
                    yield Delta(prefilled.first_text)
            chunks = backend.generate(prefilled.kv_handle, question.sampling, prefilled.first_token, stream=stream)
            first = next(chunks)
        last = yield from _deltas(itertools.chain((first,), chunks), tokens, texts)
    text = "".join(texts)
    handle, pending = (last.kv_handle, last.pending_token) if last else (prefilled.kv_handle, prefilled.first_token)
    record = {
        "kv_handle": handle,
        "pending_token": pending,
        "messages": question.messages + [{"role": "assistant", "content": text.strip()}],
        "context_tokens": prefilled.prompt_tokens + len(tokens) - 1,
        "vision_tokens": prefilled.vision_tokens,
        "kept_vision_tokens": prefilled.kept_vision_tokens,
        "pruning": prefilled.pruning,
    }
    yield Final(
        text=text.strip(),
        token_ids=tokens,
        finish_reason=last.finish_reason if last else prefilled.finish_reason,
        record=record,
        usage={
            "prompt_tokens": prefilled.prompt_tokens,
            "vision_tokens": prefilled.vision_tokens,
            "kept_vision_tokens": prefilled.kept_vision_tokens,
            "completion_tokens": len(tokens),
            "prefill_tokens": prefilled.prompt_tokens,
            "cached_images": encoded.images_cached,
            "kv_bytes": prefilled.kv_bytes,
        },
        timings={
            "encode_ms": encoded.encode_ms,
            "prefill_ms": prefilled.prefill_ms,
            "selection_ms": prefilled.selection_ms,  # of prefill_ms: choosing the tokens kept
            "ttft_ms": ttft_ms,
            "decode_ms": last.decode_ms if last else 0.0,
            "kv_store_ms": prefilled.kv_store_ms + (last.kv_store_ms if last else 0.0),
            "total_ms": (time.perf_counter() - started) * 1e3,
        },
        pruning=_applied(prefilled.pruning, prefilled.vision_tokens),
    )


def _follow_up(backend, question: Question, previous: dict, started: float, stream: bool) -> Iterator[Delta | Final]:
    chunks = backend.generate(previous["kv_handle"], question.sampling, previous["pending_token"], question.messages[-1]["content"], stream)
    try:
        first = next(chunks)
    except StageMiss:
        if question.images:  # the client sent the whole conversation (chat API): recompute it
            yield from staged_answer(backend, question, stream=stream)
            return
        # The store lost the cache (evicted) before the record that names it: the service failed
        # this conversation. A retry cannot bring the cache back, so no Retry-After.
        raise ApiError(503, "the conversation's KV cache was evicted; start a new conversation with the image", "conversation_id", kind="service_unavailable") from None
    ttft_ms = (time.perf_counter() - started) * 1e3
    tokens, texts = [], []
    last = yield from _deltas(itertools.chain((first,), chunks), tokens, texts)
    text = "".join(texts).strip()
    context = previous["context_tokens"] + last.prefill_tokens
    record = dict(
        previous,
        kv_handle=last.kv_handle,
        pending_token=last.pending_token,
        messages=question.messages + [{"role": "assistant", "content": text}],
        context_tokens=context + len(tokens) - 1,
    )
    yield Final(
        text=text,
        token_ids=tokens,
        finish_reason=last.finish_reason,
        record=record,
        usage={
            "prompt_tokens": context,
            "vision_tokens": previous["vision_tokens"],
            "kept_vision_tokens": previous["kept_vision_tokens"],
            "completion_tokens": len(tokens),
            "prefill_tokens": last.prefill_tokens,
            "cached_images": 0,
        },
        timings={"encode_ms": 0.0, "prefill_ms": last.prefill_ms, "selection_ms": 0.0, "ttft_ms": ttft_ms, "decode_ms": last.decode_ms, "kv_store_ms": last.kv_store_ms, "total_ms": (time.perf_counter() - started) * 1e3},
        pruning=_applied(previous["pruning"], previous["vision_tokens"]),
    )


def _applied(pruning: dict, vision_tokens: int) -> dict:
    return PruningConfig.from_dict(pruning).applied(vision_tokens)


def _encode_and_prefill(backend, question: Question):
    encoded = backend.encode(question.images, question.messages, question.tenant)
    try:
        return encoded, backend.prefill(encoded.prompt_ref, question.pruning, question.sampling, encoded.image_hashes)
    except StageMiss:  # the claim check went before the pruner read it: encode again, once
        encoded = backend.encode(question.images, question.messages, question.tenant)
        return encoded, backend.prefill(encoded.prompt_ref, question.pruning, question.sampling, encoded.image_hashes)


def _deltas(chunks, tokens: list[int], texts: list[str]):
    """Yields the chunks' text as deltas, collecting their tokens and text; returns the last
    chunk, which carries the whole answer when it was not streamed."""
    for chunk in chunks:
        tokens += chunk.token_ids
        texts.append(chunk.text)
        if chunk.text:
            yield Delta(chunk.text)
        if chunk.done:
            return chunk
    raise Unavailable("the generator's stream ended before its last chunk")
