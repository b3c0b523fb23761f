"""Turning what a client sent into checked inputs: images, questions and settings."""

from __future__ import annotations

import base64
import binascii
import json
import re

from pydantic import ValidationError

from dartserve.models.decode import SamplingConfig

_DATA_URL = re.compile(r"^(?i:data):(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;(?i:base64))?,(?P<data>.*)$", re.S)


class ApiError(Exception):
    """A client error with its HTTP status, OpenAI-style type and offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers or {}

    def body(self) -> dict:
        return {"error": {"type": self.kind, "message": self.message, "param": self.param}}


async def json_object(request) -> dict:
    """The body of a JSON request, which must be an object."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON, or nests too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def media_type(request) -> str:
    """The request's media type, which is case-insensitive, without its parameters."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def validated(model, fields: dict):
    """``fields`` as a ``model`` (pydantic), or a 400 naming the first field that is wrong."""
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param or None) from None


def json_body(schema: dict) -> dict:
    """An OpenAPI request body for an endpoint that reads its own body, so that clients and
    schema-driven tests see its fields; ``$defs`` are inlined, as OpenAPI cannot point at them."""
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if set(node) == {"$ref"}:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def image_bytes(value, param: str, urls=None, url_only: bool = False) -> bytes:
    """An image given as base64 (unless ``url_only``), as a base64 ``data:image/...`` URL, or as
    an http(s) URL that ``urls`` (an ``ImageUrls``) may fetch."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, "an image must be a non-empty base64 string or data URL", param)
    scheme = value.partition(":")[0].lower()
    if scheme in ("http", "https"):
        if urls is None:
            raise ApiError(400, "image URLs are not fetched; send the image as base64 or a data URL", param)
        return urls.fetch(value, param)
    if scheme == "data":
        match = _DATA_URL.match(value)
        if not match or not match.group("b64"):
            raise ApiError(400, "a data URL image must be base64-encoded (data:image/png;base64,...)", param)
        if not (match.group("mime") or "").lower().startswith("image/"):
            raise ApiError(400, f"a data URL must hold an image (data:image/...), not {match.group('mime') or 'text/plain'}", param)
        value = match.group("data")
    elif ":" in value:  # base64 has no colon: this is a URL of a kind not taken
        raise ApiError(400, f"image URLs may be data: or http(s): URLs, not {scheme[:16]!r}", param)
    elif url_only:
        raise ApiError(400, "an image URL must be a data URL (data:image/png;base64,...) or an http(s) URL", param)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image is not valid base64", param) from None
    if not data:
        raise ApiError(400, "the image is empty", param)
    return data


def sampling(max_new_tokens, temperature, top_p, seed, ignore_eos: bool = False) -> SamplingConfig:
    try:
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, ignore_eos=ignore_eos)
    except ValueError as error:
        raise ApiError(400, str(error), _param_of(str(error), ("max_new_tokens", "temperature", "top_p", "seed"))) from None


def _param_of(message: str, names) -> str | None:
    return next((n for n in names if message.startswith(n)), None)
