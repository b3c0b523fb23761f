"""Starting dartserve's processes and a private redis-server on loopback: for the benchmarks
and the tests, which run the services as users do."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dartserve(command: str, env: dict, log: Path, args: tuple[str, ...] = ()) -> subprocess.Popen:
    """``dartserve COMMAND ARGS`` as its own process with ``env`` over this one's (less its
    ``DARTSERVE_*`` settings), its output to ``log``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("DARTSERVE_")} | env
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "services.cli", command, *args], env=full, stdout=out, stderr=subprocess.STDOUT)


NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


def start_redis(port: int, timeout_s: float = 10, config: tuple[str, ...] = NO_PERSISTENCE, directory: Path | None = None) -> subprocess.Popen:
    """A redis-server on ``port`` with ``config`` (by default empty and non-persistent; files,
    if it keeps any, in ``directory``), once it answers."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed")
    where = ["--dir", str(directory)] if directory else []
    process = subprocess.Popen(
        [binary, *config, "--port", str(port), "--bind", "127.0.0.1", *where],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


STAGES = ("vision", "pruner", "generator")


@dataclass
class Distributed:
    processes: dict[str, subprocess.Popen]  # the stages and the gateway, by name
    ports: dict[str, int]  # their service ports
    metrics_ports: dict[str, int]  # the stages' Prometheus ports
    env: dict  # what a further process (a worker) needs to reach the stages

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def metrics(self) -> dict[str, str]:
        """Each service's Prometheus /metrics URL."""
        stages = {name: f"http://127.0.0.1:{port}/metrics" for name, port in self.metrics_ports.items()}
        return stages | {"gateway": f"{self.url}/metrics"}


def stage_env(env: dict, port: int, metrics_port: int) -> dict:
    return env | {"DARTSERVE_PORT": str(port), "DARTSERVE_METRICS_PORT": str(metrics_port)}


def start_distributed(env: dict, logs: Path) -> Distributed:
    """The three stages and the gateway, each its own process; if one cannot be started, those
    started before it are stopped, since no caller holds them yet."""
    ports = {name: free_port() for name in (*STAGES, "gateway")}
    metrics_ports = {name: free_port() for name in STAGES}
    addresses = {f"DARTSERVE_{name.upper()}_ADDR": f"127.0.0.1:{ports[name]}" for name in STAGES}
    processes = {}
    try:
        for name in STAGES:
            processes[name] = start_dartserve(name, stage_env(env, ports[name], metrics_ports[name]), logs / f"{name}.log")
        processes["gateway"] = start_dartserve("gateway", env | addresses | {"DARTSERVE_PORT": str(ports["gateway"])}, logs / "gateway.log")
    except BaseException:
        stop(processes.values())
        raise
    return Distributed(processes, ports, metrics_ports, env | addresses)


def stop(processes, grace_s: float = 30) -> None:
    """Asks each process to stop; one still running after ``grace_s`` is killed."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class BenchRun:
    """What a benchmark starts, as a user would: a private, empty redis-server unless it is
    given one (nothing cached before can help), and dartserve's processes on ``model``
    with ``threads`` torch threads each (``OMP_NUM_THREADS``; by default all cores each, which
    oversubscribes a small machine running several) and the settings in ``env``, logging to a
    temporary folder. Everything is stopped when the ``with`` block ends."""

    def __init__(self, model: str, threads: int | None = None, redis_url: str | None = None, env: dict | None = None) -> None:
        self.model, self.threads, self.redis_url, self.settings = model, threads, redis_url, env or {}
        self.processes: list[subprocess.Popen] = []
        self.redis: subprocess.Popen | None = None  # the private redis-server

    def __enter__(self) -> BenchRun:
        self._logs = tempfile.TemporaryDirectory()
        self.logs = Path(self._logs.name)
        try:
            if self.redis_url is None:
                port = free_port()
                self.redis = start_redis(port)
                self.processes.append(self.redis)
                self.redis_url = f"redis://127.0.0.1:{port}/0"
        except BaseException:
            self._logs.cleanup()
            raise
        self.env = {"DARTSERVE_MODEL": self.model, "DARTSERVE_REDIS_URL": self.redis_url, "HF_HUB_OFFLINE": "1"} | self.settings
        if self.threads:
            self.env["OMP_NUM_THREADS"] = str(self.threads)
        return self

    def dartserve(self, command: str, env: dict | None = None) -> subprocess.Popen:
        """``dartserve COMMAND`` with this run's settings and ``env``."""
        process = start_dartserve(command, self.env | (env or {}), self.logs / f"{command}.log")
        self.processes.append(process)
        return process

    def distributed(self) -> Distributed:
        distributed = start_distributed(self.env, self.logs)
        self.processes += distributed.processes.values()
        return distributed

    def __exit__(self, *error) -> None:
        try:
            stop(self.processes)
        finally:
            self._logs.cleanup()
