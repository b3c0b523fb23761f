"""``dartserve probe SERVICE``: exit 0 when the service on this host answers its health check,
1 otherwise. For container health checks, where a service is not reachable from outside."""

from __future__ import annotations

import socket
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import tls

HTTP_SERVICES = ("serve", "gateway")
GRPC_SERVICES = ("vision", "pruner", "generator")
SERVICES = (*HTTP_SERVICES, *GRPC_SERVICES, "worker")


def probe(service: str, settings, timeout_s: float = 3.0) -> bool:
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; use one of {', '.join(SERVICES)}")
    if service in HTTP_SERVICES:
        url = f"http://127.0.0.1:{settings.port_for('gateway')}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as reply:
                return reply.status == 200
        except OSError:
            return False
    if service in GRPC_SERVICES:
        with tls.channel(f"127.0.0.1:{settings.port_for(service)}", settings, []) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    from services.batches.namespace import batch_namespace
    from services.batches.queue import make_celery

    # The worker of this host answers a ping through the broker, in its deployment's namespace.
    replies = make_celery(settings, batch_namespace(settings)).control.ping(destination=[f"celery@{socket.gethostname()}"], timeout=timeout_s)
    return bool(replies)
