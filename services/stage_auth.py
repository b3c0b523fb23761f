"""Who may call a gRPC stage: callers that send the deployment's stage token
(``DARTSERVE_STAGE_TOKEN_FILE``, a mounted secret) as gRPC metadata, or that present a client
certificate the stage's CA signed (mutual TLS). Health checks stay open, for probes that cannot
send metadata. A stage with neither way of telling its callers apart answers anyone who reaches
it, so it says so loudly and listens on loopback only.
"""

from __future__ import annotations

import hmac
import logging

import grpc

METADATA_KEY = "x-dartserve-stage-token"
HEALTH = "/grpc.health.v1.Health/"
LOOPBACK = "127.0.0.1"
log = logging.getLogger(__name__)


def call_metadata(settings) -> tuple[tuple[str, str], ...]:
    """What a gateway or worker sends with every call to a stage."""
    return ((METADATA_KEY, settings.stage_token),) if settings.stage_token else ()


def authenticates(settings) -> bool:
    return bool(settings.stage_token or settings.tls_client_ca)


def bind_host(settings, stage: str) -> str:
    """The interface a stage listens on: loopback only, whatever DARTSERVE_HOST says, when it
    cannot authenticate its callers."""
    if authenticates(settings):
        return settings.host
    log.warning(
        "THE %s STAGE ANSWERS ANY CALLER: no DARTSERVE_STAGE_TOKEN_FILE and no DARTSERVE_TLS_CLIENT_CA "
        "is set, so it listens on %s only (DARTSERVE_HOST=%s is not used). Set one of them to serve "
        "other hosts (docs/deploy.md).", stage.upper(), LOOPBACK, settings.host,
    )
    return LOOPBACK


class StageAuth(grpc.ServerInterceptor):
    """Refuses every call but health checks that lacks the stage token, with UNAUTHENTICATED;
    the token is compared in constant time."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH) or self._valid(details.invocation_metadata):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_refuse, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_refuse_stream, handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_refuse, handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(_refuse_stream, handler.request_deserializer, handler.response_serializer)

    def _valid(self, metadata) -> bool:
        given = [value for key, value in metadata or () if key == METADATA_KEY]
        return len(given) == 1 and isinstance(given[0], str) and hmac.compare_digest(given[0].encode(), self.token)


def _refuse(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "this stage answers callers with the deployment's stage token only")


def _refuse_stream(request, context):
    _refuse(request, context)
    yield  # a generator, as a streaming handler must be; never reached
