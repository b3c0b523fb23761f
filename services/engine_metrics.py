"""The engine core's Prometheus metrics, named as vLLM's with the ``dartserve:`` prefix, for every
process that runs a core (the embedded gateway, the pruner, the generator).

The queue and the KV pool are read when Prometheus scrapes; steps and outputs are counted as
the core's loop produces them (``EngineCore.observers``, ``EngineLoop.on_output``), in the
loop's thread. ``kv_cache_usage_perc`` is a fraction, as vLLM's is.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dartserve.engine.core import EngineCore, Step
from dartserve.engine.requests import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


class EngineMetrics:
    def __init__(self, core: EngineCore, registry: CollectorRegistry, model_name: str) -> None:
        self.core = core
        labels = {"model_name": model_name}
        scheduler = core.scheduler

        def gauge(name: str, help: str, read) -> None:
            Gauge(f"dartserve:{name}", help, list(labels), registry=registry).labels(**labels).set_function(read)

        gauge("num_requests_running", "Requests in the running batch", lambda: len(scheduler.running))
        gauge("num_requests_waiting", "Requests waiting to be scheduled", lambda: len(scheduler.waiting))
        gauge("kv_cache_usage_perc", "Fraction of the KV pool's blocks in use (kept turns included)", lambda: core.pool.num_used / core.pool.num_blocks)
        groups = Gauge("dartserve:kv_cache_usage_perc_by_layer_group", "Fraction of the KV pool's blocks held by running requests' layers below K and from K on", [*labels, "layer_group"], registry=registry)
        for group in ("below_k", "from_k"):
            groups.labels(**labels, layer_group=group).set_function(lambda group=group: core.usage()[group] / core.pool.num_blocks)

        def histogram(name: str, help: str, buckets) -> Histogram:
            return Histogram(f"dartserve:{name}", help, list(labels), buckets=buckets, registry=registry).labels(**labels)

        def counter(name: str, help: str) -> Counter:
            return Counter(f"dartserve:{name}", help, list(labels), registry=registry).labels(**labels)

        self.ttft = histogram("time_to_first_token_seconds", "From arrival at the core to the first token", LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Between two tokens of a request", LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "From arrival at the core to the last token", LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "From arrival at the core to the first step it ran in", LATENCY_BUCKETS)
        self.prefill_tokens = histogram("prefill_tokens_per_step", "Prompt and fed tokens a step ran", TOKEN_BUCKETS)
        self.decode_batch = histogram("decode_batch_size", "Requests a step decoded one token for", BATCH_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.vision_tokens = counter("vision_tokens", "Vision tokens of finished prompts")
        self.vision_tokens_kept = counter("vision_tokens_kept", "Vision tokens finished prompts kept after pruning")
        self._last: dict[str, float] = {}
        core.observers.append(self.observe_step)

    def observe_step(self, step: Step) -> None:
        if step.prefill_tokens:
            self.prefill_tokens.observe(step.prefill_tokens)
        if step.decodes:
            self.decode_batch.observe(step.decodes)

    def observe_output(self, output: RequestOutput) -> None:
        state = output.state
        if state is None:
            return
        times = state.metrics
        if output.tokens:
            self.generation_tokens.inc(len(output.tokens))
            previous = self._last.get(output.request_id)
            if previous is None:
                self.ttft.observe(output.time - times.arrival)
                if times.first_scheduled is not None:
                    self.queue.observe(times.first_scheduled - times.arrival)
            else:
                self.itl.observe(output.time - previous)
            self._last[output.request_id] = output.time
        if output.finished:
            self._last.pop(output.request_id, None)
            if times.finished is not None:
                self.e2e.observe(times.finished - times.arrival)
            prompt = state.request.prompt
            if prompt is not None and state.kept_positions is not None:
                self.prompt_tokens.inc(len(prompt.input_ids))
                self.vision_tokens.inc(prompt.num_vision_tokens)
                self.vision_tokens_kept.inc(len(state.kept_positions))
