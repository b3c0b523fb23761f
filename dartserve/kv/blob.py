"""Tensors with a JSON header as one self-describing, checksummed value: how projected vision
tokens and encoded prompts travel between the stages. Nothing is ever unpickled.

Layout: ``MAGIC``, a format version, the header's length, the JSON header (kind, model
fingerprint, byte order, each tensor's name, dtype and shape, and free-form ``meta``), the
tensors' raw bytes, and the SHA-256 of everything before it. Any mismatch is a ``CacheMiss``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys

import torch

from dartserve.kv.codec import DTYPES as KV_DTYPES, CacheMiss, tensor_bytes, tensor_from_bytes

MAGIC = b"DSTB"
VERSION = 1
DTYPES = KV_DTYPES | {"int64": torch.int64}  # token ids and positions travel too
_PREFIX = struct.Struct("<HI")  # version, header length


def pack(kind: str, fingerprint: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> bytes:
    parts, described = [], []
    for name, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"cannot pack a {dtype} tensor")
        parts.append(tensor_bytes(tensor))
        described.append({"name": name, "dtype": dtype, "shape": list(tensor.shape), "bytes": len(parts[-1])})
    header = json.dumps(
        {"kind": kind, "fingerprint": fingerprint, "byteorder": sys.byteorder, "tensors": described, "meta": meta or {}},
        separators=(",", ":"),
    ).encode()
    body = MAGIC + _PREFIX.pack(VERSION, len(header)) + header + b"".join(parts)
    return body + hashlib.sha256(body).digest()


def unpack(data: bytes, kind: str, fingerprint: str, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and ``meta`` of a value written by ``pack`` with the same kind and fingerprint."""
    start = len(MAGIC) + _PREFIX.size
    if len(data) < start + 32 or not data.startswith(MAGIC):
        raise CacheMiss(f"not a dartserve {kind} value")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise CacheMiss(f"{kind} value checksum mismatch")
    version, header_len = _PREFIX.unpack_from(body, len(MAGIC))
    if version != VERSION:
        raise CacheMiss(f"{kind} format version {version}, this build reads {VERSION}")
    try:
        header = json.loads(body[start : start + header_len])
        if header["kind"] != kind or header["fingerprint"] != fingerprint:
            raise CacheMiss(f"a {header['kind']} value of another model or kind")
        if header["byteorder"] != sys.byteorder:
            raise CacheMiss(f"{kind} value in another byte order")
        tensors, offset = {}, start + header_len
        for t in header["tensors"]:
            tensors[t["name"]] = tensor_from_bytes(body[offset : offset + t["bytes"]], DTYPES[t["dtype"]], t["shape"], device)
            offset += t["bytes"]
        if offset != len(body):
            raise CacheMiss(f"{kind} value has trailing bytes")
        return tensors, header["meta"]
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CacheMiss(f"malformed {kind} value: {error}") from None
