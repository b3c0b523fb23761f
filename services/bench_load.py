"""``dartserve bench load``: a bounded load generator against a gateway.

It sends ``requests`` answers with ``concurrency`` clients at once (stopping early after
``duration_s``), and reports throughput, latency percentiles of the answered requests, errors
by type (a 429 is admission control saying no, on purpose), and the peak memory each service
reports. Without ``url`` it starts distributed mode itself over a private redis-server.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dartserve.bench import cpu_name
from services.bench import demo_requests, wait_ready
from services.gateway.metrics import PEAK_MEMORY
from services.processes import BenchRun

DISTINCT_IMAGES = 50  # requests cycle over these: some images come again, as in use


def run_load_bench(
    url: str | None = None, requests: int = 1000, concurrency: int = 16, duration_s: float = 600.0,
    metrics: dict[str, str] | None = None, model: str | None = None, threads: int | None = None,
) -> dict:
    bodies = demo_requests(DISTINCT_IMAGES)
    if url is not None:
        result = asyncio.run(_load(url, bodies, requests, concurrency, duration_s))
        return _report(result, metrics or {"gateway": f"{url}/metrics"}, url, requests, concurrency, threads)
    from dartserve.demo import default_model

    with BenchRun(model or default_model(), threads) as run:
        distributed = run.distributed()
        wait_ready(distributed.url, distributed.processes["gateway"])
        result = asyncio.run(_load(distributed.url, bodies, requests, concurrency, duration_s))
        return _report(result, distributed.metrics, "distributed mode started by the bench", requests, concurrency, threads)


async def _load(url: str, bodies: list[dict], requests: int, concurrency: int, duration_s: float) -> dict:
    latencies, errors = [], Counter()
    sent = 0
    deadline = time.monotonic() + duration_s

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.monotonic() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            started = time.perf_counter()
            try:
                reply = await http.post("/v1/answer", json=body)
            except httpx.HTTPError as error:
                errors[f"transport {type(error).__name__}"] += 1
                continue
            if reply.status_code == 200:
                latencies.append((time.perf_counter() - started) * 1e3)
            else:
                errors[f"{reply.status_code} {_error_type(reply)}"] += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"sent": sent, "latencies": latencies, "errors": dict(errors), "seconds": elapsed}


def _error_type(reply: httpx.Response) -> str:
    try:
        return reply.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return "unknown"


def _report(result: dict, metrics: dict[str, str], target: str, requests: int, concurrency: int, threads) -> dict:
    latencies = sorted(result["latencies"])

    def percentile(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))] if latencies else None

    return {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "target": target,
        "threads_per_process": threads or "default",
        "requests": requests,
        "concurrency": concurrency,
        "sent": result["sent"],
        "answered": len(latencies),
        "seconds": result["seconds"],
        "answers_per_s": len(latencies) / result["seconds"],
        "latency_ms": {"p50": percentile(0.5), "p95": percentile(0.95), "p99": percentile(0.99), "mean": statistics.fmean(latencies) if latencies else None},
        "errors": result["errors"],
        "peak_memory_mb": {name: _peak_memory_mb(address) for name, address in metrics.items()},
    }


def _peak_memory_mb(url: str) -> float | None:
    try:
        text = httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return None
    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == PEAK_MEMORY]
    return values[0] / 2**20 if values else None
