"""Real processes for the tests: a private redis-server and dartserve's services on loopback."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.processes import NO_PERSISTENCE, free_port, start_dartserve, start_redis, stop


class RedisServer:
    """A redis-server of the test's own, on a free port, that can be stopped and started again:
    by default empty and non-persistent, or with ``config`` and its files in ``directory``."""

    def __init__(self, config: tuple[str, ...] = NO_PERSISTENCE, directory: Path | None = None) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed: `make test` installs it (tools/require-redis)")
        self.port, self.config, self.directory = free_port(), config, directory
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = start_redis(self.port, config=self.config, directory=self.directory)

    def stop(self) -> None:
        stop([self.process], grace_s=10)


TEST_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # offline, and light on a small machine


def dartserve_process(command: str, env: dict, log: Path, args: tuple[str, ...] = ()) -> subprocess.Popen:
    return start_dartserve(command, {**env, **TEST_ENV}, log, args)


def wait_until(check, what: str, process: subprocess.Popen | None = None, log: Path | None = None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up in {timeout_s} s:\n{log.read_text() if log else ''}")
        time.sleep(0.2)


@contextmanager
def serving(env: dict, log: Path) -> Iterator[str]:
    """``dartserve serve`` on a free port given by its flags, with ``env``; yields its URL."""
    import httpx

    port = free_port()
    process = dartserve_process("serve", env, log, ("--host", "127.0.0.1", "--port", str(port)))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, "dartserve serve", process, log)
        yield url
    finally:
        stop([process])
