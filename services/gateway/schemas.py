"""The gateway's responses as OpenAPI sees them: bodies and errors of every endpoint.

The endpoints build their bodies themselves (a stream, or one JSON object); these models only
describe them, so that clients generated from ``/openapi.json`` know what comes back.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, create_model

from dartserve.pruning.registry import all_settings


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class LineError(BaseModel):
    line: int
    message: str
    param: str | None


class InvalidBatch(ErrorBody):
    errors: list[LineError]


class Usage(BaseModel):
    prompt_tokens: int
    vision_tokens: int
    kept_vision_tokens: int
    completion_tokens: int
    prefill_tokens: int  # fewer than prompt_tokens on a follow-up turn
    cached_images: int
    kv_bytes: int | None = None  # first turns only


class Timings(BaseModel):
    encode_ms: float
    prefill_ms: float
    selection_ms: float
    ttft_ms: float
    decode_ms: float
    kv_store_ms: float
    total_ms: float


AppliedPruning = create_model(
    "AppliedPruning",
    __doc__="The pruning applied: the method and the settings it reads, the budget in tokens.",
    method=(str, ...),
    budget=(int | None, None),
    layer=(int | None, None),
    **{s.name: (int | None if s.kind is int else float | None, None) for s in all_settings().values()},
)


class Answer(BaseModel):
    answer: str
    model: str
    conversation_id: str | None  # None in a batch's results
    finish_reason: Literal["stop", "length"]
    usage: Usage
    timings: Timings
    pruning: AppliedPruning


class Message(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: Message
    finish_reason: Literal["stop", "length"]
    logprobs: None


class CachedTokens(BaseModel):
    cached_tokens: int


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


class Extension(BaseModel):
    """dartserve's figures for a chat completion, under ``dartserve``."""

    usage: Usage
    timings: Timings
    pruning: AppliedPruning


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: ChatUsage
    dartserve: Extension


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class BatchReadiness(BaseModel):
    available: bool
    reason: str | None = Field(description="why batches do not run now, e.g. no Redis")


class Readiness(BaseModel):
    ready: bool
    stages: dict[str, bool]
    batches: BatchReadiness | None = Field(default=None, description="whether batches run now; not part of ready")


class RequestCounts(BaseModel):
    total: int
    done: int
    failed: int


class Batch(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    model: str
    status: Literal["queued", "running", "completed", "cancelled", "failed"]
    request_counts: RequestCounts
    created_at: int | None
    started_at: int | None
    finished_at: int | None
    cancelled_at: int | None
    expires_at: int | None
    error: str | None


_WHY = {
    400: "invalid input; `param` names the field",
    401: "no valid API key (only where the gateway has keys)",
    404: "unknown model, conversation or batch",
    409: "the conversation's previous turn is still being answered, or the batch has finished",
    413: "the body is over the size limit",
    415: "another content type",
    429: "at the request limit, or a stage at its call limit; see Retry-After",
    500: "a bug; the log has the request id's trace",
    503: "a stage or Redis cannot be reached (with Retry-After)",
}
SSE = {"text/event-stream": {"schema": {"type": "string"}, "description": "with stream: true, server-sent events"}}


def errors(*statuses: int) -> dict:
    """OpenAPI responses for these error statuses, each with the JSON error body."""
    return {status: {"model": ErrorBody, "description": _WHY[status]} for status in (*statuses, 401, 500)}


def answered(model: type[BaseModel], *statuses: int, stream: bool = False, status: int = 200) -> dict:
    """OpenAPI responses: ``model`` on success (or server-sent events), and the errors."""
    return {status: {"model": model} | ({"content": SSE} if stream else {})} | errors(*statuses)


def drop_validation_errors(app) -> None:
    """FastAPI declares a 422 for every path parameter; these are plain strings, which it never
    refuses, and bad bodies are 400s: the schema says so."""
    default = app.openapi

    def openapi() -> dict:
        schema = default()  # built once, then cached by FastAPI: the edit below stays
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi
