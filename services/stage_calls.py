"""What every call to a gRPC stage goes through: the caller's request id, set for the call's
log lines; one log line when it ends; and the stage's Prometheus metrics, served over HTTP on
a port of their own: calls by method and status code, calls in flight (what the stages'
autoscalers read), and latency. Health and reflection calls are left out."""

from __future__ import annotations

import logging
import threading
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
            call = self._begin(method, context)
            try:
                response = behaviour(request, context)
                call.outcome = grpc.StatusCode.OK
                return response
            finally:
                call.done()

        return observed

    def _stream(self, method: str, behaviour):
        def observed(request, context):
            call = self._begin(method, context)
            try:
                yield from behaviour(request, context)
                call.outcome = grpc.StatusCode.OK
            except GeneratorExit:  # the caller went away or its deadline passed
                call.outcome = grpc.StatusCode.CANCELLED
                raise
            finally:
                call.done()

        return observed

    def _begin(self, method: str, context) -> _Call:
        # The handler runs on a pool thread, which keeps no id from its last call.
        given = dict(context.invocation_metadata()).get(request_ids.HEADER)
        call = _Call(method, request_ids.accept(given), context, self._end)
        request_ids.current.set(call.request_id)
        self.in_flight.inc()
        return call

    def _end(self, call: _Call) -> None:
        seconds = time.perf_counter() - call.started
        code = call.context.code() or call.outcome
        if call.caller_left and code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):  # no one received the answer
            code = grpc.StatusCode.DEADLINE_EXCEEDED if call.context.time_remaining() == 0 else grpc.StatusCode.CANCELLED
        self.calls.labels(self.stage, call.method, code.name).inc()
        self.latency.labels(self.stage, call.method).observe(seconds)
        self.in_flight.dec()  # after the counts (the log line comes later): none in flight, all counted
        fields = {"method": call.method, "code": code.name, "ms": round(seconds * 1e3, 2), "request_id": call.request_id}
        log.info("%s %s", call.method, code.name, extra={"fields": fields})


class _Call:
    """A call ends when its handler has returned and its status has been sent, whichever is
    later: its log line and metrics are written then, in the usual case on the server's
    polling thread, so the caller does not wait for them (0.3 ms a call on a 2-core VM), and a
    handler still working after its caller went away still counts as in flight. A log sink
    that blocks (stderr nobody reads) then stalls the whole server, health checks included."""

    def __init__(self, method: str, request_id: str, context, end) -> None:
        self.method, self.request_id, self.context, self.end = method, request_id, context, end
        self.started = time.perf_counter()
        self.outcome = grpc.StatusCode.UNKNOWN  # unless the handler returns, or is cancelled
        self.caller_left = False  # the call was over before its handler stopped
        self.pending, self.lock = 2, threading.Lock()
        if not context.add_callback(self.over):  # over already: cancelled before its handler began
            self.over()

    def over(self) -> None:
        self.done(caller_left=True)

    def done(self, caller_left: bool = False) -> None:
        with self.lock:
            self.pending -= 1
            if self.pending:
                self.caller_left = caller_left
                return
        self.end(self)
