"""What every gRPC service shares: health, reflection, message limits, error codes, shutdown."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dartserve.checks import SettingError
from dartserve.kv.store import StoreUnavailable
from dartserve.stages import Abandoned, StageMiss
from services import tls
from services.stage_auth import StageAuth, bind_host
from services.stage_calls import StageCalls

PARAM_KEY = "dartserve-param"  # trailing metadata: which request setting an INVALID_ARGUMENT is about
log = logging.getLogger(__name__)


@contextmanager
def status_codes(context: grpc.ServicerContext):
    """Library errors as gRPC status codes: bad input, a value gone from the store, the store down."""
    try:
        yield
    except ValueError as error:
        if isinstance(error, SettingError):  # the gateway names the field in its 400
            context.set_trailing_metadata(((PARAM_KEY, error.param),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    except StageMiss as error:
        context.abort(grpc.StatusCode.NOT_FOUND, str(error))
    except StoreUnavailable as error:
        context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
    except Abandoned as error:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(error))


def caller_waiting(context: grpc.ServicerContext) -> bool:
    """Whether the caller still waits: not cancelled, deadline not passed."""
    remaining = context.time_remaining()
    return context.is_active() and (remaining is None or remaining > 0)


def check_deadline(context: grpc.ServicerContext) -> None:
    """Refuses work whose caller has already given up."""
    if not caller_waiting(context):
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the caller's deadline passed before the work began")


class Server:
    """A started gRPC server with its health service; ``port`` is the one bound."""

    def __init__(self, stage: str, service_name: str, register, settings, port: int) -> None:
        limit = settings.max_message_bytes
        self.metrics = StageCalls(stage, service_name)
        # The metrics come first: a call refused for its token is counted too (UNAUTHENTICATED).
        interceptors = [self.metrics] + ([StageAuth(settings.stage_token)] if settings.stage_token else [])
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers),
            interceptors=interceptors,
            # Calls beyond those served and queued are refused at once (RESOURCE_EXHAUSTED).
            maximum_concurrent_rpcs=settings.workers + settings.max_queue,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Clients reconnect every few minutes, so new replicas behind one Service
                # address get their share; a call in flight keeps its connection to the end.
                ("grpc.max_connection_age_ms", int(settings.connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(settings.rpc_timeout_s * 1000)),
            ],
        )
        register(self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server
        )
        credentials = tls.server_credentials(settings)
        host = bind_host(settings, stage)
        address = f"{host}:{port}"
        self.port = self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        # On SIGTERM calls in flight may run to their deadline: a decode is not cut off halfway.
        self.service_name, self.drain_s, self.grace_s = service_name, settings.drain_s, settings.rpc_timeout_s
        if settings.metrics:
            self.metrics.serve(host, settings.metrics_port_for(stage))
        self.server.start()
        for name in ("", service_name):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float | None = None) -> None:
        """Health turns NOT_SERVING first; ``drain_s`` later, when load balancers have seen it,
        new calls are refused; calls in flight get ``grace_s`` (by default the calls' timeout)
        to finish."""
        self.health.enter_graceful_shutdown()
        time.sleep(self.drain_s)
        self.server.stop(self.grace_s if grace_s is None else grace_s).wait()

    def wait_for_signal(self) -> None:
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
        log.info("%s serving on port %d", self.service_name, self.port)
        stopping.wait()
        self.stop()
