"""What the service benchmarks share: starting and waiting for processes, the demo task's
requests, and what a process takes of the machine."""

from __future__ import annotations

import base64
import io
import subprocess
import time

import httpx


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"a service exited with {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} was not ready in {timeout_s} s")


def minor_faults(pid: int) -> int | None:
    """The page faults a process has taken that needed no disk read (fresh or reclaimed memory);
    None where there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[7])  # after the command name, which may hold spaces
    except OSError:
        return None


def resident_mb(pid: int) -> float | None:
    """A process's resident memory now (``VmRSS``), in MB; None where there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/status") as status:
            line = next(line for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    return round(int(line.split()[1]) / 1024, 1)


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def demo_requests(count: int, first: int = 0) -> list[dict]:
    from dartserve.demo.data import example

    bodies = []
    for index in range(first, first + count):
        item = example("test", index)
        bodies.append({"image": base64.b64encode(png(item.image)).decode(), "question": item.question, "max_new_tokens": 8})
    return bodies
