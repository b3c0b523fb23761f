"""Settings between their JSON, library and protobuf forms."""

from __future__ import annotations

from dartserve.models.decode import SamplingConfig
from dartserve.pruning.config import PruningConfig
from dartserve.stages import Chunk
from services.rpc.dartserve.v1 import common_pb2, generator_pb2

_OPTIONAL_PRUNING = ("budget", "ratio", "layer", "pivot_image", "pivot_text", "seed")


def merge_pruning(requested: dict | None, defaults: dict) -> PruningConfig:
    """The request's pruning with the server's defaults for what it omits. A request that names
    a budget or a ratio replaces the default's amount."""
    requested = requested or {}
    if not isinstance(requested, dict):
        raise ValueError("pruning must be an object")
    merged = dict(defaults)
    if "budget" in requested or "ratio" in requested:
        merged.pop("budget", None)
        merged.pop("ratio", None)
    merged.update({k: v for k, v in requested.items() if v is not None or k in ("budget", "ratio")})
    return PruningConfig.from_dict(merged)


def pruning_to_proto(config: PruningConfig) -> common_pb2.Pruning:
    message = common_pb2.Pruning(method=config.method)
    for name in _OPTIONAL_PRUNING:
        value = getattr(config, name)
        if value is not None:
            setattr(message, name, value)
    return message


def pruning_from_proto(message: common_pb2.Pruning) -> PruningConfig:
    fields = {name: getattr(message, name) for name in _OPTIONAL_PRUNING if message.HasField(name)}
    return PruningConfig(method=message.method or "dart", **fields)


def sampling_to_proto(config: SamplingConfig) -> common_pb2.Sampling:
    return common_pb2.Sampling(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
        stop_token_ids=list(config.stop_token_ids),
    )


def sampling_from_proto(message: common_pb2.Sampling) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=message.max_new_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        seed=message.seed,
        stop_token_ids=tuple(message.stop_token_ids),
    )


def chunk_to_proto(chunk: Chunk) -> generator_pb2.GenerateChunk:
    return generator_pb2.GenerateChunk(
        token_ids=chunk.token_ids,
        text=chunk.text,
        done=chunk.done,
        kv_handle=chunk.kv_handle,
        pending_token=chunk.pending_token,
        finish_reason=chunk.finish_reason,
        prefill_tokens=chunk.prefill_tokens,
        prefill_ms=chunk.prefill_ms,
        decode_ms=chunk.decode_ms,
        kv_store_ms=chunk.kv_store_ms,
    )


def chunk_from_proto(c: generator_pb2.GenerateChunk) -> Chunk:
    return Chunk(list(c.token_ids), c.text, c.done, c.kv_handle, c.pending_token, c.finish_reason, c.prefill_tokens, c.prefill_ms, c.decode_ms, c.kv_store_ms)
