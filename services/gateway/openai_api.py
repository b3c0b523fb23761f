"""``POST /v1/chat/completions``, compatible with OpenAI's chat API and its Python client.

Images come as ``image_url`` content parts holding data URLs. A first ``system`` message is
rendered by the model's chat template, as its other turns are. Clients resend the whole
conversation each turn; when its earlier turns match a conversation this gateway answered,
only the new turn is prefilled, on top of the cached KV. Pruning is a dartserve extension
field (``extra_body={"pruning": {...}}`` in the client). Sampling defaults to greedy.
"""

from __future__ import annotations

import hashlib
import time
import uuid

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict

from services.gateway import conversations as conv
from services.frontend.answers import PruningIn
from services.gateway.app import Gateway
from services.frontend.inputs import ApiError, image_bytes, json_body, json_object, media_type, sampling, validated
from services.gateway.middleware import tenant
from services.frontend.pipeline import Delta, Final
from services.gateway.schemas import ChatCompletion, answered


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ChatIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    messages: list[dict]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    pruning: PruningIn | None = None
    ignore_eos: bool = False  # as vLLM's: the model's end-of-sequence token does not end the answer (benchmarks)


class ChatShape:
    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.model, self.include_usage = model, include_usage
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.started = False

    def body(self, final: Final) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": final.text}, "finish_reason": final.finish_reason, "logprobs": None}],
            "usage": _usage(final),
            "dartserve": _extension(final),
        }

    def chunks(self, event) -> list[dict]:
        out = []
        if not self.started:
            self.started = True
            out.append(self._chunk({"role": "assistant", "content": ""}, None))
        if isinstance(event, Delta):
            out.append(self._chunk({"content": event.text}, None))
            return out
        last = self._chunk({}, event.finish_reason)
        last["dartserve"] = _extension(event)
        out.append(last)
        if self.include_usage:  # as OpenAI sends it: a last chunk with no choices
            out.append(self._envelope() | {"choices": [], "usage": _usage(event)})
        return out

    def _chunk(self, delta: dict, finish_reason) -> dict:
        return self._envelope() | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    def _envelope(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}


def _extension(final: Final) -> dict:
    """What dartserve adds to a response: its usage figures, timings and the pruning applied."""
    return {"usage": final.usage, "timings": final.timings, "pruning": final.pruning}


def _usage(final: Final) -> dict:
    prompt, completion = final.usage["prompt_tokens"], final.usage["completion_tokens"]
    cached = prompt - final.usage["prefill_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}


_MESSAGE_KEYS = {"role", "content"}
_PART_KEYS = {"text": {"type", "text"}, "image_url": {"type", "image_url"}}


def parse_messages(messages: list[dict], image_urls=None) -> tuple[list[bytes], list[dict]]:
    """Images (in order) and text turns from OpenAI-style messages; images only in the first
    user turn. A key the served models have no use for is refused, not dropped."""
    images: list[bytes] = []
    turns: list[dict] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages.{i}.role")
        role, content = message["role"], message.get("content")
        if role == "system" and i > 0:  # the chat templates render one, before the conversation
            raise ApiError(400, "a system message may only be the first message", f"messages.{i}")
        _only(message, _MESSAGE_KEYS, f"messages.{i}")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                where = f"messages.{i}.content.{j}"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                    if role != "user" or any(turn["role"] == "user" for turn in turns):
                        raise ApiError(400, "images must be in the first user message", where)
                    images.append(_image(part["image_url"], f"{where}.image_url", image_urls))
                else:
                    raise ApiError(400, "a content part is {type: text, text} or {type: image_url, image_url: {url}}", where)
                _only(part, _PART_KEYS[kind], where)
            text = " ".join(texts)
        else:
            raise ApiError(400, "message content must be a string or a list of parts", f"messages.{i}.content")
        turns.append({"role": role, "content": text})
    if not turns or turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise ApiError(400, "the last message must be the user's, with text", "messages")
    system = int(turns[0]["role"] == "system")
    for i, turn in enumerate(turns[system:], start=system):
        if turn["role"] != ("user" if (i - system) % 2 == 0 else "assistant"):
            raise ApiError(400, "user and assistant messages must alternate, starting with the user", f"messages.{i}")
    return images, turns


def _image(image_url: dict, where: str, image_urls) -> bytes:
    _only(image_url, {"url", "detail"}, where)
    if image_url.get("detail", "auto") != "auto":  # the model sees every image at its own resolution
        raise ApiError(400, "only detail 'auto' is supported", f"{where}.detail")
    return image_bytes(image_url.get("url"), f"{where}.url", image_urls, url_only=True)


def _only(given: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(given) - allowed)
    if extra:
        raise ApiError(400, f"{where}: {extra[0]!r} is not supported here (allowed: {', '.join(sorted(allowed))})", f"{where}.{extra[0]}")


def register_chat(app: FastAPI, gateway: Gateway) -> None:
    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatIn.model_json_schema()), responses=answered(ChatCompletion, 400, 404, 413, 415, 429, 503, stream=True))
    async def chat(request: Request):
        async def read():
            if media_type(request) != "application/json":
                raise ApiError(415, "send application/json", kind="unsupported_media_type")
            return gateway, tenant(request), validated(ChatIn, await json_object(request))

        return await gateway.admitted(request, _chat, read)


def _chat(gateway: Gateway, tenant: str, body: ChatIn, slot):
    if body.model != gateway.model_name:
        raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists {gateway.model_name!r}", "model", kind="not_found")
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    images, turns = parse_messages(body.messages, gateway.policy.image_urls)
    limits = {name: value for name, value in (("max_completion_tokens", body.max_completion_tokens), ("max_tokens", body.max_tokens)) if value is not None}
    if len(set(limits.values())) > 1:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; give one of them", "max_tokens")
    config = _sampling(body, limits)
    hashes = [hashlib.sha256(image).hexdigest() for image in images]
    answered = any(turn["role"] == "assistant" for turn in turns)
    previous = gateway.conversations.get(conv.by_content(tenant, gateway.model_name, hashes, turns[:-1])) if answered else None
    pruning = body.pruning.model_dump(exclude_unset=True) if body.pruning else None
    question = gateway.question(images, turns, pruning, config, tenant, previous["context_tokens"] if previous else 0)
    if previous is not None and previous["pruning"] != question.pruning.to_dict():
        previous = None  # a conversation keeps its pruning: other settings start it afresh, checked as a whole
        question = gateway.question(images, turns, pruning, config, tenant)
    if previous is None and not images:
        raise ApiError(400, "the first user message must carry an image (an image_url part)", "messages")
    key = lambda final: conv.by_content(tenant, gateway.model_name, hashes, final.record["messages"])  # noqa: E731
    shape = ChatShape(gateway.model_name, include_usage=body.stream_options is not None and body.stream_options.include_usage)
    return gateway.run(question, previous, key, shape, body.stream, "/v1/chat/completions", slot)


def _sampling(body: ChatIn, limits: dict):
    """Greedy unless asked otherwise; errors name the request's own fields."""
    try:
        return sampling(next(iter(limits.values()), 64), 0.0 if body.temperature is None else body.temperature, 1.0 if body.top_p is None else body.top_p, body.seed or 0, body.ignore_eos)
    except ApiError as error:
        if error.param != "max_new_tokens":
            raise
        name = next(iter(limits), "max_tokens")
        raise ApiError(400, error.message.replace("max_new_tokens", name, 1), name) from None
