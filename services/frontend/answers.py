"""A ``/v1/answer`` request and its response body, shared by the endpoint and the batch worker,
so that a batch item is answered exactly as the same request sent on its own."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, create_model

from dartserve.models.base import chat_messages
from dartserve.pruning.registry import all_settings, available_methods
from services.convert import merge_pruning
from services.frontend.image_urls import ImageUrls
from services.frontend.inputs import ApiError, image_bytes, sampling, validated
from services.frontend.pipeline import Delta, Final, Question
from services.frontend.prompt_limits import PromptLimits


def _pruning_model() -> type[BaseModel]:
    """The request's ``pruning`` object: the method, the amount, the layer, and every method's
    settings as the methods declare them (``dartserve.pruning.registry.Setting``)."""
    settings = {
        s.name: (int | None if s.kind is int else float | None, Field(default=None, description=s.help)) for s in all_settings().values()
    }
    return create_model(
        "PruningIn",
        __config__=ConfigDict(extra="forbid", strict=True),
        method=(str | None, Field(default=None, description=f"one of {', '.join(available_methods())}")),
        budget=(int | None, Field(default=None, description="vision tokens kept over all the request's images")),
        ratio=(float | None, Field(default=None, description="or the fraction of them kept")),
        layer=(int | None, Field(default=None, description="K: the layer the method prunes at; 0 before the LLM")),
        **settings,
    )


PruningIn = _pruning_model()


class AnswerIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: str
    image: str | None = None
    images: list[str] | None = None
    pruning: PruningIn | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # as vLLM's: the end-of-sequence token does not end the answer (benchmarks)
    stream: bool = False
    conversation_id: str | None = Field(default=None, min_length=1, max_length=256)


def parse_answer(fields: dict) -> AnswerIn:
    """The request's fields, checked."""
    body = validated(AnswerIn, fields)
    if not body.question.strip():
        raise ApiError(400, "question must not be empty", "question")
    return body


def answer_images(body: AnswerIn, uploads: list[bytes], policy: Policy) -> list[bytes]:
    images = list(uploads)
    if body.image is not None:
        images.append(image_bytes(body.image, "image", policy.image_urls))
    return images + [image_bytes(image, f"images.{i}", policy.image_urls) for i, image in enumerate(body.images or [])]


@dataclass(frozen=True)
class Policy:
    """The server's defaults and limits for a question."""

    default_pruning: dict
    max_images: int
    image_urls: ImageUrls | None = None  # None: no image is fetched by URL
    limits: PromptLimits | None = None  # None: the stages alone find a prompt too long

    @classmethod
    def from_settings(cls, settings, limits: PromptLimits | None = None) -> Policy:
        urls = ImageUrls(settings.image_url_hosts, settings.max_message_bytes) if settings.image_url_hosts else None
        return cls(settings.pruning, settings.max_images, urls, limits)


def make_question(
    images: list[bytes], messages: list[dict], pruning: dict | None, sampling_config, policy: Policy, tenant: str = "", context_tokens: int = 0
) -> Question:
    """``context_tokens``: the positions of the conversation's turns that are cached, of which
    only the last message is new."""
    if len(images) > policy.max_images:
        raise ApiError(400, f"{len(images)} images; at most {policy.max_images} are allowed in one request", "images")
    chat_messages(messages)  # text the tokenizer can take (no lone surrogates), in turns that alternate
    if policy.limits is not None:
        # What the cache holds is counted in context_tokens, images included. A system message
        # counts for nothing: some templates leave it out.
        new = messages[-1:] if context_tokens else [m for m in messages if m["role"] != "system"]
        policy.limits.check([] if context_tokens else images, [m["content"] for m in new], sampling_config.max_new_tokens, context_tokens)
    try:
        config = merge_pruning(pruning, policy.default_pruning)
    except ValueError as error:
        raise ApiError(400, str(error), "pruning") from None
    return Question(images, messages, config, sampling_config, tenant)


def first_turn(body: AnswerIn, images: list[bytes], policy: Policy, tenant: str = "") -> Question:
    """The question of a request that starts a conversation."""
    if not images:
        raise ApiError(400, "a conversation's first turn needs an image: 'image', 'images' or an uploaded file", "image")
    config = sampling(body.max_new_tokens, body.temperature, body.top_p, body.seed, body.ignore_eos)
    # An explicit null budget or ratio is kept: it asks for every vision token.
    pruning = body.pruning.model_dump(exclude_unset=True) if body.pruning else None
    return make_question(images, [{"role": "user", "content": body.question}], pruning, config, policy, tenant)


class AnswerShape:
    """/v1/answer's response: one JSON object, or SSE deltas then that object."""

    def __init__(self, model: str, conversation_id: str | None) -> None:
        self.model, self.conversation_id = model, conversation_id

    def body(self, final: Final) -> dict:
        return {
            "answer": final.text,
            "model": self.model,
            "conversation_id": self.conversation_id,
            "finish_reason": final.finish_reason,
            "usage": final.usage,
            "timings": final.timings,
            "pruning": final.pruning,
        }

    def chunks(self, event) -> list[dict]:
        if isinstance(event, Delta):
            return [{"type": "delta", "text": event.text}]
        return [{"type": "answer", **self.body(event)}]
