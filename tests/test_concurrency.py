"""Concurrent clients through the gateway, embedded and distributed: every answer equals its
request's run alone in the in-process engine, whatever else ran in the same steps."""

import threading

import httpx
import pytest

from cluster import b64, png, running_cluster
from dartserve.demo import CHECKPOINT
from dartserve.engine import Engine
from dartserve.models.decode import SamplingConfig
from dartserve.pruning import PruningConfig
from processes import TEST_ENV, dartserve_process, free_port, stop, wait_until

PRUNINGS = [
    {"method": "dart", "budget": 64, "layer": 2},
    {"method": "none"},
    {"method": "fastv", "ratio": 0.25, "layer": 1},
    {"method": "divprune", "budget": 32, "layer": 0},
    {"method": "cdpruner", "budget": 48, "layer": 2},
    {"method": "dart", "budget": 16, "layer": 0},
    {"method": "pooling", "budget": 64, "layer": 3},
    {"method": "random", "budget": 96, "layer": 2, "seed": 5},
]


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def service(request, redis_server, tmp_path_factory):
    logs = tmp_path_factory.mktemp(request.param)
    if request.param == "distributed":
        with running_cluster(redis_server.url, logs) as cluster:
            ports = cluster["metrics_ports"]
            yield {"url": cluster["url"], "cores": [f"http://127.0.0.1:{ports[stage]}/metrics" for stage in ("pruner", "generator")]}
        return
    port = free_port()
    env = {"DARTSERVE_MODEL": str(CHECKPOINT), "DARTSERVE_REDIS_URL": redis_server.url, **TEST_ENV}
    process = dartserve_process("serve", env, logs / "serve.log", ("--port", str(port)))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, "dartserve serve", process, logs / "serve.log")
        yield {"url": url, "cores": [f"{url}/metrics"]}
    finally:
        stop([process])


def test_sixteen_concurrent_requests_each_equal_their_solo_engine_run(service):
    engine = Engine.load(str(CHECKPOINT))
    requests = []
    for index in range(16):
        data, item = png(40 + index)
        requests.append((data, item, PRUNINGS[index % len(PRUNINGS)]))
    replies: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def ask(index):
        data, item, pruning = requests[index]
        start.wait()  # all at once: they share the engine's steps
        body = {"image": b64(data), "question": item.question, "pruning": pruning, "max_new_tokens": 8}
        replies[index] = httpx.post(f"{service['url']}/v1/answer", json=body, timeout=120)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (data, item, pruning), reply in zip(requests, replies):
        assert reply.status_code == 200, reply.text
        body = reply.json()
        alone = engine.generate([item.image], item.question, PruningConfig(**pruning), SamplingConfig(max_new_tokens=8))
        assert (body["answer"], body["usage"]["completion_tokens"]) == (alone.text, len(alone.token_ids)), pruning
        assert body["usage"]["kept_vision_tokens"] == alone.stats.vision_tokens_kept


def test_every_process_that_runs_a_core_reports_its_metrics_as_vllm_names_them(service):
    """After the answers above: the embedded gateway, or the pruner and the generator."""
    for url in service["cores"]:
        text = httpx.get(url).text
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_usage_perc_by_layer_group",
                     "time_to_first_token_seconds_count", "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                     "request_queue_time_seconds_count", "prefill_tokens_per_step_count", "decode_batch_size_count",
                     "prompt_tokens_total", "generation_tokens_total", "vision_tokens_kept_total"):
            assert f"dartserve:{name}" in text, (url, name)
        ttft = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("dartserve:time_to_first_token_seconds_count"))
        assert ttft >= 16


@pytest.mark.parametrize("distributed", [False, True], ids=["embedded", "distributed"])
def test_bench_serve_reports_the_service_against_the_engine_alone(distributed):
    from services.bench_serve import run_serve_bench

    rows = run_serve_bench(("demo",), (1, 2), distributed=distributed, requests=3, floor_rounds=3)
    assert [(r["workload"], r["mode"], r["concurrency"]) for r in rows] == [("demo", "distributed" if distributed else "embedded", c) for c in (1, 2)]
    assert [r["runs"] for r in rows] == [1, 3]  # one client: the service and the engine take turns per request
    for row in rows:
        assert row["exact"] is True and row["requests"] == 3
        assert row["output_throughput"] > 0 and row["engine_output_throughput"] > 0 and row["engine_ms"] > 0
        assert row["ttft_p50_ms"] <= row["e2e_p50_ms"] and row["e2e_p50_ms"] <= row["e2e_p95_ms"]
        memory = row["memory_mb"]
        assert set(memory) == ({"vision", "pruner", "generator", "gateway"} if distributed else {"serve"}) and all(m > 0 for m in memory.values())
    if distributed:
        assert rows[0]["design_floor"]["rounds"] == 3


def test_counting_a_questions_tokens_leaves_the_engines_tokenizer_as_it_was(engine):
    """The gateway counts a question's tokens with special tokens split, in its request threads,
    while the engine's thread tokenizes prompts whose <image> must stay one token."""
    from services.frontend.prompt_limits import PromptLimits

    limits = PromptLimits.of_adapter(engine.adapter)
    backend = engine.adapter.processor.tokenizer.backend_tokenizer
    limits.check([], ["what is <image> here?"], 4)
    assert backend.encode_special_tokens is False
    assert limits.tokenizer.backend_tokenizer.encode_special_tokens is True
