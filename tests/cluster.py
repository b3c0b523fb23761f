"""Distributed mode on loopback for the tests: the three gRPC stages and the gateway as
separate processes over a private redis-server, and demo images to send them."""

from __future__ import annotations

import base64
import contextlib
import io
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dartserve.demo import CHECKPOINT
from dartserve.demo.data import example
from processes import TEST_ENV, dartserve_process, stop, wait_until
from services.processes import STAGES, stage_env, start_distributed


@contextlib.contextmanager
def running_cluster(redis_url: str, logs: Path, extra_env: dict | None = None):
    """Yields ``{"url", "ports", "metrics_ports", "processes", "env", "logs"}`` once every stage is serving
    and the gateway is ready; ``env`` is what a further process (a worker) needs to reach them."""
    common = {"DARTSERVE_REDIS_URL": redis_url, "DARTSERVE_MODEL": str(CHECKPOINT), **TEST_ENV, **(extra_env or {})}
    distributed = start_distributed(common, logs)
    processes = distributed.processes
    try:
        for name in STAGES:
            channel = grpc.insecure_channel(f"127.0.0.1:{distributed.ports[name]}")
            check = lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1  # noqa: E731
            wait_until(check, name, processes[name], logs / f"{name}.log")
        url = distributed.url
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, "gateway", processes["gateway"], logs / "gateway.log")
        yield {"url": url, "ports": distributed.ports, "metrics_ports": distributed.metrics_ports, "processes": processes, "env": distributed.env, "logs": logs}
    finally:
        stop(processes.values())


@contextlib.contextmanager
def pruner_down(cluster, log):
    """The pruner stopped for the block, then started again on its ports."""
    port = cluster["ports"]["pruner"]
    stop([cluster["processes"]["pruner"]])
    try:
        yield
    finally:
        env = stage_env(cluster["env"], port, cluster["metrics_ports"]["pruner"])
        cluster["processes"]["pruner"] = dartserve_process("pruner", env, log)


def png(index: int, split: str = "test") -> tuple[bytes, object]:
    item = example(split, index)
    buffer = io.BytesIO()
    item.image.save(buffer, "PNG")
    return buffer.getvalue(), item


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
