"""How the gateway and the worker reach the model: every backend answers a ``Question``
(``answer``: the answer's events) and raises the same errors: ``ValueError`` for bad input,
``Unavailable`` when a stage or the store cannot be reached in time. ``GrpcBackend`` calls the
three gRPC stages; ``engine_backend.EngineBackend`` runs the engine in this process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import grpc.experimental
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dartserve.checks import SettingError
from dartserve.models.decode import SamplingConfig
from dartserve.pruning.config import PruningConfig
from dartserve.stages import Chunk, Encoded, Prefilled, StageMiss
from services import request_ids, stage_auth, tls
from services.frontend.errors import Overloaded, Unavailable
from services.frontend.pipeline import staged_answer
from services.grpc_server import PARAM_KEY
from services.convert import from_message, pruning_to_proto, sampling_to_proto
from services.rpc.dartserve.v1 import generator_pb2, generator_pb2_grpc, pruner_pb2, pruner_pb2_grpc, vision_pb2, vision_pb2_grpc


class GrpcBackend:
    """The three stages over gRPC, handing work over through Redis (``pipeline.staged_answer``)."""

    def __init__(self, settings) -> None:
        limit = settings.max_message_bytes
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Reads a server stream on the calling thread instead of handing each message over
            # from gRPC's own thread: less latency per streamed token.
            (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
            # Every address a stage's name resolves to (a headless Service) takes calls in turn.
            ("grpc.lb_policy_name", "round_robin"),
        ]
        self.timeout_s = settings.rpc_timeout_s
        self.credentials = stage_auth.call_metadata(settings)
        self.channels = {
            name: tls.channel(address, settings, options)
            for name, address in (("vision", settings.vision_addr), ("pruner", settings.pruner_addr), ("generator", settings.generator_addr))
        }
        self.vision = vision_pb2_grpc.VisionServiceStub(self.channels["vision"])
        self.pruner = pruner_pb2_grpc.PrunerServiceStub(self.channels["pruner"])
        self.generator = generator_pb2_grpc.GeneratorServiceStub(self.channels["generator"])

    def answer(self, question, previous: dict | None = None, stream: bool = True):
        return staged_answer(self, question, previous, stream)

    def encode(self, images: list[bytes], conversation: list[dict], tenant: str = "") -> Encoded:
        turns = [vision_pb2.Turn(role=t["role"], content=t["content"]) for t in conversation]
        request = vision_pb2.EncodeRequest(images=images, conversation=turns, cache_scope=tenant)
        with _rpc_errors():
            reply = self.vision.Encode(request, timeout=self.timeout_s, metadata=self._metadata())
        return from_message(reply, Encoded)

    def prefill(self, prompt_ref: str, pruning: PruningConfig, sampling: SamplingConfig, image_hashes: list[str] = ()) -> Prefilled:
        request = pruner_pb2.PrefillRequest(
            prompt_ref=prompt_ref, pruning=pruning_to_proto(pruning), sampling=sampling_to_proto(sampling), image_hashes=image_hashes
        )
        with _rpc_errors():
            r = self.pruner.Prefill(request, timeout=self.timeout_s, metadata=self._metadata())
        return from_message(r, Prefilled, pruning=json.loads(r.pruning_json))

    def generate(self, kv_handle: str, sampling: SamplingConfig, pending: int, question: str | None = None, stream: bool = True) -> Iterator[Chunk]:
        request = generator_pb2.GenerateRequest(kv_handle=kv_handle, sampling=sampling_to_proto(sampling), pending_token=pending, question=question)
        with _rpc_errors():
            if not stream:
                yield from_message(self.generator.Complete(request, timeout=self.timeout_s, metadata=self._metadata()), Chunk)
                return
            chunks = self.generator.Generate(request, timeout=self.timeout_s, metadata=self._metadata())
            try:
                yield from (from_message(c, Chunk) for c in chunks)
            finally:
                chunks.cancel()  # a client that went away stops the decode

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return self.credentials + request_ids.metadata()

    def readiness(self) -> dict[str, bool]:
        """Whether each stage answers its health check, asked of all at once. A stage that refuses
        it for being at its call limit is up: busy, which the gateway answers with 429s, not a
        reason to take the gateway out of service."""
        checks = {name: health_pb2_grpc.HealthStub(channel).Check.future(health_pb2.HealthCheckRequest(), timeout=2.0) for name, channel in self.channels.items()}
        status = {}
        for name, check in checks.items():
            try:
                status[name] = check.result().status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError as error:
                status[name] = error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return status

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


class _rpc_errors:
    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if not isinstance(error, grpc.RpcError):
            return False
        code, details = error.code(), error.details()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            param = dict(error.trailing_metadata() or ()).get(PARAM_KEY)
            raise (SettingError(details, param) if param else ValueError(details)) from None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or ""):
            raise ValueError("the request is over DARTSERVE_MAX_MESSAGE_MB once its images are encoded") from None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise Overloaded(f"a stage is at its limit of concurrent calls: {details}") from None
        if code == grpc.StatusCode.NOT_FOUND:
            raise StageMiss(details) from None
        if code in _UNAVAILABLE:
            raise Unavailable(f"{code.name}: {details}") from None
        return False  # anything else is a bug in a stage, and shows as one


# UNAUTHENTICATED: the stage and its caller hold different stage tokens, a deployment fault.
_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAUTHENTICATED}
