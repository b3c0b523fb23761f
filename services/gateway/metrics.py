"""The gateway's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


PEAK_MEMORY = "dartserve_process_peak_resident_memory_bytes"


def peak_memory_bytes() -> float:
    """This process's peak resident memory (Linux's VmHWM); 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0.0
    return float(line.split()[1]) * 1024


def add_peak_memory(registry: CollectorRegistry) -> None:
    Gauge(PEAK_MEMORY, "Peak resident memory of this process", registry=registry).set_function(peak_memory_bytes)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        add_peak_memory(self.registry)
        self.requests = Counter("dartserve_requests", "Requests by endpoint and status code", ["endpoint", "status"], registry=self.registry)
        self.in_flight = Gauge("dartserve_in_flight_requests", "Requests being answered now", registry=self.registry)
        self.ttft = Histogram("dartserve_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("dartserve_request_latency_seconds", "End-to-end latency of answered requests", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("dartserve_tokens", "Tokens by kind: prompt, vision, kept_vision, completion, prefill", ["kind"], registry=self.registry)
        self.kept_ratio = Histogram(
            "dartserve_kept_vision_token_ratio", "Fraction of vision tokens kept by pruning",
            buckets=(0.05, 0.1, 0.15, 0.2, 0.25, 0.33, 0.5, 0.75, 1.0), registry=self.registry,
        )
        self.cache_hits = Counter("dartserve_cache_hits", "Work served from cache: vision (encoded images), conversation (KV of earlier turns)", ["cache"], registry=self.registry)

    def observe(self, final) -> None:
        usage, timings = final.usage, final.timings
        self.ttft.observe(timings["ttft_ms"] / 1e3)
        self.latency.observe(timings["total_ms"] / 1e3)
        for kind in ("prompt_tokens", "vision_tokens", "kept_vision_tokens", "completion_tokens", "prefill_tokens"):
            self.tokens.labels(kind.removesuffix("_tokens")).inc(usage.get(kind, 0))
        if usage["vision_tokens"]:
            self.kept_ratio.observe(usage["kept_vision_tokens"] / usage["vision_tokens"])
        if usage["cached_images"]:
            self.cache_hits.labels("vision").inc(usage["cached_images"])
        if usage["prefill_tokens"] < usage["prompt_tokens"]:  # a turn that continued from the cache
            self.cache_hits.labels("conversation").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
