"""What every call to a gRPC stage goes through: the caller's request id, set for the call's
log lines; one log line when it ends; and the stage's Prometheus metrics, served over HTTP on
a port of their own: calls by method and status code, calls in flight (what the stages'
autoscalers read), and latency. Health and reflection calls are left out."""

from __future__ import annotations

import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services import request_ids
from services.gateway.metrics import LATENCY_BUCKETS, add_peak_memory

IN_FLIGHT = "dartserve_stage_in_flight"
log = logging.getLogger(__name__)


class StageCalls(grpc.ServerInterceptor):
    def __init__(self, stage: str, service_name: str) -> None:
        self.stage, self.prefix = stage, f"/{service_name}/"
        self.registry = CollectorRegistry()
        add_peak_memory(self.registry)
        self.in_flight = Gauge(IN_FLIGHT, "Calls being served now", ["stage"], registry=self.registry).labels(stage)
        self.calls = Counter("dartserve_stage_calls", "Calls by method and status code", ["stage", "method", "code"], registry=self.registry)
        self.latency = Histogram("dartserve_stage_call_seconds", "Time to serve a call", ["stage", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        method = details.method.removeprefix(self.prefix)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        return handler

    def _unary(self, method: str, behaviour):
        def observed(request, context):
            started, outcome = self._begin(context), grpc.StatusCode.UNKNOWN  # unless it returns
            try:
                response = behaviour(request, context)
                outcome = grpc.StatusCode.OK
                return response
            finally:
                self._end(method, context.code() or outcome, started)

        return observed

    def _stream(self, method: str, behaviour):
        def observed(request, context):
            started, outcome = self._begin(context), grpc.StatusCode.UNKNOWN
            try:
                yield from behaviour(request, context)
                outcome = grpc.StatusCode.OK
            except GeneratorExit:  # the caller went away or its deadline passed
                outcome = grpc.StatusCode.CANCELLED
                raise
            finally:
                self._end(method, context.code() or outcome, started)

        return observed

    def _begin(self, context) -> float:
        # The handler runs on a pool thread, which keeps no id from its last call.
        given = dict(context.invocation_metadata()).get(request_ids.HEADER)
        request_ids.current.set(request_ids.accept(given))
        self.in_flight.inc()
        return time.perf_counter()

    def _end(self, method: str, code: grpc.StatusCode, started: float) -> None:
        seconds = time.perf_counter() - started
        self.in_flight.dec()
        self.calls.labels(self.stage, method, code.name).inc()
        self.latency.labels(self.stage, method).observe(seconds)
        log.info("%s %s", method, code.name, extra={"fields": {"method": method, "code": code.name, "ms": round(seconds * 1e3, 2)}})
