"""Ragged KV cache <-> bytes: one value per layer and a manifest that describes and checks them.

Nothing is ever unpickled. The manifest is ``MAGIC``, a format version, a JSON header and the
SHA-256 of that header; the header names the model fingerprint, dtype, byte order, layer
groups, token indices, next position, per-layer shapes and per-layer SHA-256 checksums. A
value that fails any check is a ``CacheMiss``: the caller recomputes, it never uses it.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys

import torch

from dartserve.kv.cache import RaggedKVCache
from dartserve.kv.store import EncodedCache

MAGIC = b"DSKV"
VERSION = 1
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16)}


class CacheMiss(Exception):
    """Cached bytes that are missing, stale, foreign or damaged."""


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's raw bytes, in this machine's byte order."""
    return tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(raw: bytes, dtype: torch.dtype, shape, device: str | torch.device) -> torch.Tensor:
    """The inverse of ``tensor_bytes``, on ``device``; the tensor owns a copy of ``raw``."""
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).view(tuple(shape)).to(device)


def encode(cache: RaggedKVCache, fingerprint: str, meta: dict | None = None) -> EncodedCache:
    """One request's cache as bytes (use ``RaggedKVCache.select`` first for a batch); ``meta``
    rides along in the manifest (``read_header(...)["meta"]``)."""
    if cache.batch_size != 1:
        raise ValueError(f"encode one request at a time, got a batch of {cache.batch_size}")
    dtype = str(cache.keys[0].dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"cannot encode a {dtype} cache")
    layers = [tensor_bytes(k[0]) + tensor_bytes(v[0]) for k, v in zip(cache.keys, cache.values)]
    header = {
        "fingerprint": fingerprint,
        "dtype": dtype,
        "byteorder": sys.byteorder,
        "layer_group": list(cache.layer_group),
        "token_index": [t[0].tolist() for t in cache.token_index],
        "next_position": int(cache.next_position[0]),
        "shapes": [list(k.shape[1:]) for k in cache.keys],
        "checksums": [hashlib.sha256(layer).hexdigest() for layer in layers],
        "meta": meta or {},
    }
    body = json.dumps(header, separators=(",", ":")).encode()
    return EncodedCache(MAGIC + struct.pack("<H", VERSION) + body + hashlib.sha256(body).digest(), layers)


def read_header(manifest: bytes, fingerprint: str) -> dict:
    if len(manifest) < len(MAGIC) + 2 + 32 or not manifest.startswith(MAGIC):
        raise CacheMiss("not a dartserve KV manifest")
    (version,) = struct.unpack_from("<H", manifest, len(MAGIC))
    if version != VERSION:
        raise CacheMiss(f"KV format version {version}, this build reads {VERSION}")
    body, digest = manifest[len(MAGIC) + 2 : -32], manifest[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise CacheMiss("KV manifest checksum mismatch")
    try:
        header = json.loads(body)
        foreign = header["fingerprint"] != fingerprint
        unreadable = header["byteorder"] != sys.byteorder or header["dtype"] not in DTYPES
    except (ValueError, KeyError, TypeError) as error:
        raise CacheMiss(f"malformed KV manifest: {error}") from None
    if foreign:
        raise CacheMiss("KV cache of another model")
    if unreadable:
        raise CacheMiss("KV cache in a byte order or dtype this machine cannot read")
    return header


def decode(encoded: EncodedCache, fingerprint: str, device: str | torch.device = "cpu") -> RaggedKVCache:
    header = read_header(encoded.manifest, fingerprint)
    try:
        shapes, checksums = list(header["shapes"]), list(header["checksums"])
        layer_group, token_index, next_position = tuple(header["layer_group"]), list(header["token_index"]), int(header["next_position"])
    except (KeyError, TypeError, ValueError) as error:
        raise CacheMiss(f"malformed KV manifest: {error}") from None
    if not len(encoded.layers) == len(shapes) == len(checksums) == len(layer_group):
        raise CacheMiss("KV cache has the wrong number of layers")
    try:  # the header is checked against itself: a checksum shows damage, not a wrong writer
        index = [torch.tensor([t], dtype=torch.long) for t in token_index]
        slots = [len(token_index[group]) for group in layer_group]
        consistent = all(index_row.dim() == 2 for index_row in index) and all(
            group >= 0 and len(shape) == 3 and shape[1] == n for group, shape, n in zip(layer_group, shapes, slots)
        )
    except (IndexError, TypeError, ValueError, RuntimeError) as error:
        raise CacheMiss(f"malformed KV manifest: {error}") from None
    if not consistent:
        raise CacheMiss("KV manifest shapes and token index do not agree")
    dtype = DTYPES[header["dtype"]]
    keys, values = [], []
    for layer, shape, checksum in zip(encoded.layers, shapes, checksums):
        if hashlib.sha256(layer).hexdigest() != checksum:
            raise CacheMiss("KV layer checksum mismatch")
        try:
            key, value = tensor_from_bytes(layer, dtype, (2, *shape), device)
        except (RuntimeError, TypeError, ValueError) as error:
            raise CacheMiss(f"KV layer does not match its shape: {error}") from None
        keys.append(key[None])
        values.append(value[None])
    return RaggedKVCache(
        keys=keys,
        values=values,
        layer_group=layer_group,
        token_index=[t.to(device) for t in index],
        next_position=torch.tensor([next_position], dtype=torch.long, device=device),
    )
