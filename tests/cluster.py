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
from processes import dartserve_process, free_port, stop, wait_until

STAGES = ("vision", "pruner", "generator")


@contextlib.contextmanager
def running_cluster(redis_url: str, logs: Path, extra_env: dict | None = None):
    """Yields ``{"url", "ports", "metrics_ports", "processes", "env", "logs"}`` once every stage is serving
    and the gateway is ready; ``env`` is what a further process (a worker) needs to reach them."""
    ports = {name: free_port() for name in (*STAGES, "gateway")}
    metrics_ports = {name: free_port() for name in STAGES}
    common = {"DARTSERVE_REDIS_URL": redis_url, "DARTSERVE_MODEL": str(CHECKPOINT), **(extra_env or {})}
    addresses = {f"DARTSERVE_{name.upper()}_ADDR": f"127.0.0.1:{ports[name]}" for name in STAGES}
    processes = {}
    try:
        for name in STAGES:
            processes[name] = dartserve_process(name, stage_env(common, ports[name], metrics_ports[name]), logs / f"{name}.log")
        processes["gateway"] = dartserve_process("gateway", {**common, **addresses, "DARTSERVE_PORT": str(ports["gateway"])}, logs / "gateway.log")
        for name in STAGES:
            channel = grpc.insecure_channel(f"127.0.0.1:{ports[name]}")
            check = lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1  # noqa: E731
            wait_until(check, name, processes[name], logs / f"{name}.log")
        url = f"http://127.0.0.1:{ports['gateway']}"
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, "gateway", processes["gateway"], logs / "gateway.log")
        yield {"url": url, "ports": ports, "metrics_ports": metrics_ports, "processes": processes, "env": {**common, **addresses}, "logs": logs}
    finally:
        for process in processes.values():
            stop(process)


def stage_env(common: dict, port: int, metrics_port: int) -> dict:
    return {**common, "DARTSERVE_PORT": str(port), "DARTSERVE_METRICS_PORT": str(metrics_port)}


@contextlib.contextmanager
def pruner_down(cluster, log):
    """The pruner stopped for the block, then started again on its ports."""
    port = cluster["ports"]["pruner"]
    stop(cluster["processes"]["pruner"])
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
