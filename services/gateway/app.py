"""The FastAPI app: /v1/answer, the OpenAI-compatible chat API, /v1/models, health and metrics."""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dartserve.stages import StageMiss
from services.gateway import conversations as conv
from services.gateway.admission import RETRY_AFTER_S, Admission, Slot
from services.frontend.errors import Overloaded, Unavailable
from services.frontend.answers import AnswerIn, AnswerShape, Policy, answer_images, first_turn, make_question, parse_answer
from services.frontend.inputs import ApiError, json_body, json_object, media_type, sampling
from services.gateway.metrics import Metrics
from services.gateway.pump import Pump
from services.gateway.middleware import CLIENT_LEFT, COUNTED_BY_STREAM, SERVER_ERROR, ApiKeys, BodyGuard, RequestLog, endpoint, state, tenant
from services.frontend.pipeline import Final, Question
from services.gateway.schemas import Answer, Health, ModelCard, ModelList, Readiness, answered, drop_validation_errors


log = logging.getLogger(__name__)
SPARE_THREADS = 8


def _no_turn() -> None:
    """A request that names no conversation holds none."""


class Gateway:
    """The app's state: how it reaches the stages, its conversations, defaults and metrics."""

    def __init__(self, backend, conversations: conv.Conversations, model_name: str, settings, policy: Policy, batches=None) -> None:
        self.backend, self.conversations, self.model_name, self.policy = backend, conversations, model_name, policy
        self.batches = batches  # None: this gateway takes no batches
        self.max_body_bytes, self.max_batch_bytes = settings.max_message_bytes, settings.batch_max_mb << 20
        self.admission = Admission(settings.max_requests, "answering")
        # Bodies still arriving hold no answer slot: a client that uploads slowly keeps no one
        # else from being answered, and BodyGuard bounds how long it may take.
        self.uploads = Admission(settings.max_uploads, "receiving")
        self.api_keys, self.open_paths, self.body_timeout_s = settings.api_keys, settings.open_paths, settings.body_timeout_s
        self.metrics = Metrics()
        self.metrics.in_flight.set_function(lambda: self.admission.active)  # admitted requests are the ones in flight
        self.created = int(time.time())

    def question(self, images: list[bytes], messages: list[dict], pruning: dict | None, sampling_config, tenant: str, context_tokens: int = 0) -> Question:
        return make_question(images, messages, pruning, sampling_config, self.policy, tenant, context_tokens)

    async def admitted(self, request: Request, work, read):
        """Reads the request's body (``await read()``: the arguments of ``work``), then admits
        it and runs ``work(*arguments, slot)`` on a thread. A request that would find every
        slot taken is refused before its body is read. A streamed answer keeps its slot until
        the stream ends, and counts itself in the metrics then."""
        self.admission.check()
        with self.uploads.enter():
            arguments = await read()
        slot = self.admission.enter()
        try:
            response = await run_in_threadpool(work, *arguments, slot)
        except BaseException:
            slot.release()
            raise
        if isinstance(response, StreamingResponse):
            state(request.scope)[COUNTED_BY_STREAM] = True
        else:
            slot.release()
        return response

    def run(self, question: Question, previous: dict | None, record_key, shape, stream: bool, endpoint: str, slot: Slot, end_turn=_no_turn):
        """Answers ``question``; ``shape`` turns events into response bodies (one JSON, or SSE).
        ``end_turn`` is called once the conversation's record is written, or the answer failed
        or its client left."""
        started = time.monotonic()
        events = self.backend.answer(question, previous, stream)
        if not stream:
            try:
                final = next(e for e in events if isinstance(e, Final))
                self._finish(final, record_key, started)
            finally:
                end_turn()
            return JSONResponse(shape.body(final))
        try:
            first = next(events)  # errors before the first token still get a proper status
        except BaseException:
            end_turn()
            raise
        ended = []

        def end(status: str) -> None:
            """Counts the stream under the status it ended with, once, whichever way it ends."""
            if not ended:
                ended.append(status)
                self.metrics.requests.labels(endpoint, status).inc()

        def stream_events():
            try:
                for event in itertools.chain((first,), events):
                    text = "".join(f"data: {json.dumps(body)}\n\n" for body in shape.chunks(event))
                    if isinstance(event, Final):
                        self._finish(event, record_key, started)
                        end("200")
                        end_turn()  # before the client can read the end and send the next turn
                        slot.release()
                        text += "data: [DONE]\n\n"
                    yield text
            except (ApiError, Unavailable, StageMiss, ValueError) as error:
                # The 200 is sent: the client learns of the failure in the stream, the metrics
                # under the status it would have had.
                failure = as_api_error(error, endpoint)
                end(str(failure.status))
                yield f"data: {json.dumps(failure.body())}\n\n"
            except Exception:  # a bug: the client learns that the answer failed, the log why
                log.exception("an answer failed while streaming")
                end("500")
                yield f"data: {json.dumps(SERVER_ERROR)}\n\n"
            finally:
                events.close()  # a client that left stops the decode, and a gRPC stream is cancelled
                end(str(CLIENT_LEFT))  # unless it ended above: the client left mid-answer
                end_turn()
                slot.release()

        events_text = stream_events()
        # The first write is made here, in the answer's thread: the event loop sends it with the
        # headers, with no hop to another thread before the first token reaches the client.
        stream = Pump(events_text, head=next(events_text, ""))

        def after_stream():
            """Runs once the response is over, however it ended. A stream the client left is
            closed after the event it waits for, not whenever it is collected; one that never
            began runs no ``finally``, so the turn and the slot are released here too."""
            stream.close()
            end(str(CLIENT_LEFT))
            end_turn()
            slot.release()

        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}, background=BackgroundTask(after_stream))

    def _finish(self, final: Final, record_key, started: float) -> None:
        self.conversations.put(record_key(final), final.record, age_s=time.monotonic() - started)
        self.metrics.observe(final)


def as_api_error(error: ApiError | ValueError | Unavailable | StageMiss, endpoint: str) -> ApiError:
    """The HTTP error that a library or stage error is, in a reply or in a stream. What a stage
    or the store said when it failed (addresses, keys) goes to the log, under the request id;
    the client gets a message that does not change with them."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ValueError):
        return ApiError(400, str(error), _param(error, endpoint))
    log.warning("answered %s: %s", "429" if isinstance(error, Overloaded) else "503", error)
    if isinstance(error, Overloaded):
        return ApiError(429, error.public, kind="rate_limit_exceeded", headers={"Retry-After": RETRY_AFTER_S})
    public = error.public if isinstance(error, Unavailable) else Unavailable.public
    return ApiError(503, public, kind="service_unavailable", headers={"Retry-After": RETRY_AFTER_S})


def create_app(gateway: Gateway, batch_worker=None) -> FastAPI:
    """``batch_worker``: the ``EmbeddedWorker`` that ``dartserve serve`` runs while it serves;
    it stops at shutdown, before uvicorn ends the process with the signal that asked it to."""
    from services.gateway.batch_api import register_batches
    from services.gateway.openai_api import register_chat

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # An answer holds a worker thread while it runs: beyond every admitted one, threads are
        # left for readiness checks and batch calls, so the limit answers 429 before they queue.
        anyio.to_thread.current_default_thread_limiter().total_tokens = gateway.admission.limit + SPARE_THREADS
        if batch_worker is not None:
            batch_worker.start()
        try:
            yield
        finally:
            if batch_worker is not None:
                await anyio.to_thread.run_sync(batch_worker.stop)

    # /docs serves Swagger UI's files itself, so that it also works where no CDN can be reached.
    app = FastAPIOffline(title="dartserve", version="1", summary="Multimodal LLM serving with DART visual-token pruning", lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    def library_error(request: Request, error: ValueError | Unavailable | StageMiss):
        return api_error(request, as_api_error(error, endpoint(request.scope)))

    for kind in (ValueError, Unavailable, StageMiss):
        app.add_exception_handler(kind, library_error)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found" if error.status_code == 404 else "invalid_request_error"
        return api_error(request, ApiError(error.status_code, str(error.detail), kind=kind, headers=error.headers))  # a 405 keeps its Allow

    # Each one added goes outside those before it: RequestLog, then ApiKeys, then BodyGuard.
    app.add_middleware(BodyGuard, limit_for=lambda path: gateway.max_batch_bytes if path == "/v1/batches" else gateway.max_body_bytes, timeout_s=gateway.body_timeout_s)
    app.add_middleware(ApiKeys, keys=gateway.api_keys, open_paths=gateway.open_paths)
    app.add_middleware(RequestLog, metrics=gateway.metrics)

    @app.post("/v1/answer", openapi_extra=json_body(AnswerIn.model_json_schema()), responses=answered(Answer, 400, 404, 409, 413, 415, 429, 503, stream=True))
    async def answer_endpoint(request: Request):
        async def read():
            fields, uploads = await _answer_fields(request)
            return gateway, tenant(request), parse_answer(fields), uploads

        return await gateway.admitted(request, _answer, read)

    def model_card() -> dict:
        return {"id": gateway.model_name, "object": "model", "created": gateway.created, "owned_by": "dartserve"}

    @app.get("/v1/models", responses=answered(ModelList))
    def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", responses=answered(ModelCard, 404))
    def model(model: str):
        if model != gateway.model_name:
            raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists {gateway.model_name!r}", "model", kind="not_found")
        return model_card()

    @app.get("/healthz", responses={200: {"model": Health}})
    async def healthz():  # on the event loop: alive even when every worker thread is taken
        return {"status": "ok"}

    @app.get("/readyz", responses={200: {"model": Readiness}, 503: {"model": Readiness, "description": "a stage or the store does not answer"}})
    def readyz():
        stages = gateway.backend.readiness() | {"store": gateway.conversations.reachable()}
        ready = all(stages.values())
        body = {"ready": ready, "stages": stages}
        if gateway.batches is not None:  # questions are answered without them: ready either way
            body["batches"] = gateway.batches.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"description": "Prometheus text format 0.0.4"}})
    async def metrics():
        return PlainTextResponse(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    register_chat(app, gateway)
    if gateway.batches is not None:
        register_batches(app, gateway.batches, gateway.uploads)
    drop_validation_errors(app)
    return app


# The chat API's names for what /v1/answer calls max_new_tokens, question and image(s).
_CHAT_PARAMS = {"max_new_tokens": "max_tokens", "question": "messages", "image": "messages", "images": "messages"}


def _param(error: ValueError, endpoint: str) -> str | None:
    """The request field a library error is about, in the endpoint's own names."""
    param = getattr(error, "param", None)
    return _CHAT_PARAMS.get(param, param) if endpoint == "/v1/chat/completions" else param


async def _answer_fields(request: Request) -> tuple[dict, list[bytes]]:
    """The request's fields and its uploaded image files (multipart)."""
    kind = media_type(request)
    if kind == "application/json":
        return await json_object(request), []
    if kind == "multipart/form-data":
        form = await request.form()
        fields: dict = {}
        uploads = []
        for name, value in form.multi_items():
            if hasattr(value, "read"):
                if name not in ("image", "images"):
                    raise ApiError(400, f"unexpected file field {name!r}; upload images as 'image'", name)
                uploads.append(await value.read())
            elif name in fields:
                raise ApiError(400, f"form field {name!r} is given more than once", name)
            elif name in ("question", "conversation_id") or (name == "image" and not value.startswith('"')):
                fields[name] = value  # strings as they are; an image as base64 or a URL
            else:
                try:
                    fields[name] = json.loads(value)
                except ValueError:
                    raise ApiError(400, f"form field {name!r} must be JSON (a number, true/false or an object)", name) from None
        return fields, uploads
    raise ApiError(415, "send application/json or multipart/form-data", kind="unsupported_media_type")


def _answer(gateway: Gateway, tenant: str, body: AnswerIn, uploads: list[bytes], slot: Slot):
    images = answer_images(body, uploads, gateway.policy)
    key = conv.by_id(tenant, body.conversation_id) if body.conversation_id else None
    # The conversation is held before its record is read: see Conversations.begin_turn.
    end_turn = gateway.conversations.begin_turn(key) if key else _no_turn
    try:
        previous = gateway.conversations.get(key) if key else None
        return _turn(gateway, tenant, body, images, previous, slot, end_turn)
    except BaseException:
        end_turn()
        raise


def _turn(gateway: Gateway, tenant: str, body: AnswerIn, images: list[bytes], previous: dict | None, slot: Slot, end_turn):
    if previous is None:
        if body.conversation_id and not images:
            raise ApiError(404, f"conversation {body.conversation_id!r} is unknown or expired", "conversation_id", kind="not_found")
        question = first_turn(body, images, gateway.policy, tenant)
    else:
        if images:
            raise ApiError(400, "images belong to a conversation's first turn; this conversation already has its images", "image")
        if body.pruning is not None:
            raise ApiError(400, "a conversation keeps the pruning of its first turn", "pruning")
        config = sampling(body.max_new_tokens, body.temperature, body.top_p, body.seed, body.ignore_eos)
        messages = previous["messages"] + [{"role": "user", "content": body.question}]
        question = gateway.question(images, messages, None, config, tenant, previous["context_tokens"])
    conversation_id = body.conversation_id or uuid.uuid4().hex
    shape = AnswerShape(gateway.model_name, conversation_id)
    key = conv.by_id(tenant, conversation_id)
    return gateway.run(question, previous, lambda final: key, shape, body.stream, "/v1/answer", slot, end_turn)
