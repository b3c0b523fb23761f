"""Settings between their JSON, library and protobuf forms."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from dartserve.checks import SettingError
from dartserve.models.decode import SamplingConfig
from dartserve.pruning.config import PruningConfig, refuse_unread, settings_read_by
from services.rpc.dartserve.v1 import common_pb2

def merge_pruning(requested: dict | None, defaults: dict) -> PruningConfig:
    """The request's pruning with the server's defaults for what it omits, among the settings
    its method reads; one it does not read is an error. A request that names a budget or a
    ratio replaces the default's amount; an explicit null for either keeps every token."""
    requested = requested or {}
    if not isinstance(requested, dict):
        raise ValueError("pruning must be an object")
    method = requested.get("method") or defaults.get("method", "dart")
    used = ("method", *settings_read_by(method))
    # A null is "not set", except for the amount of a method that reads one: keep every token.
    given = {k: v for k, v in requested.items() if v is not None or (k in ("budget", "ratio") and k in used)}
    refuse_unread(method, sorted(given))
    merged = {k: v for k, v in defaults.items() if k in used}
    if "budget" in given or "ratio" in given:
        merged.pop("budget", None)
        merged.pop("ratio", None)
    merged.update(given)
    return PruningConfig.from_dict(merged)


def pruning_to_proto(config: PruningConfig) -> common_pb2.Pruning:
    message = common_pb2.Pruning(method=config.method, settings_json=json.dumps(config.settings))
    for name in ("budget", "ratio", "layer"):
        value = getattr(config, name)
        if value is not None and config.method != "none":
            _set(message, name, value, f"pruning.{name}")
    return message


def pruning_from_proto(message: common_pb2.Pruning) -> PruningConfig:
    fields = {name: getattr(message, name) for name in ("budget", "ratio", "layer") if message.HasField(name)}
    try:
        settings = json.loads(message.settings_json or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"pruning settings_json is not JSON: {error}") from None
    if not isinstance(settings, dict):
        raise ValueError("pruning settings_json must be a JSON object")
    return PruningConfig(method=message.method or "dart", **fields, **settings)


def sampling_to_proto(config: SamplingConfig) -> common_pb2.Sampling:
    message = common_pb2.Sampling()
    for name in ("max_new_tokens", "temperature", "top_p", "seed", "ignore_eos"):
        _set(message, name, getattr(config, name), name)
    try:
        message.stop_token_ids.extend(config.stop_token_ids)
    except ValueError:
        raise SettingError("a stop token id is out of range", "stop_token_ids") from None
    return message


def _set(message, name: str, value, param: str) -> None:
    """A field of ``message``, or an error that names the request's setting when the value is
    past what the field holds (a budget over 2**31, say)."""
    try:
        setattr(message, name, value)
    except ValueError:
        raise SettingError(f"{param} is out of range: {value}", param) from None


def sampling_from_proto(message: common_pb2.Sampling) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=message.max_new_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        seed=message.seed,
        stop_token_ids=tuple(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
    )


def to_message(record, message_type, drop: tuple[str, ...] = (), **extra):
    """A stage's result (a dataclass) as the reply that carries it, field for field; ``drop``
    names fields that travel in another form, given in ``extra``."""
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name not in drop}
    return message_type(**fields, **extra)


def from_message(message, record_type, **extra):
    """The inverse of ``to_message``: ``extra`` gives the fields that travel in another form."""
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(record_type) if f.name not in extra}
    lists = {name: list(value) for name, value in fields.items() if isinstance(value, Sequence) and not isinstance(value, str)}
    return record_type(**(fields | lists), **extra)
