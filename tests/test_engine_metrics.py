"""The engine core's Prometheus metrics, named as vLLM's, as a scrape reads them."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dartserve.engine.core import EngineCore
from dartserve.engine.loop import EngineLoop
from dartserve.engine.requests import CoreRequest
from dartserve.models import SamplingConfig
from dartserve.pruning import PruningConfig
from services.engine_metrics import EngineMetrics
from tiny_checkpoints import make_image


def scrape(registry) -> dict:
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name")))] = sample.value
    return samples


def test_a_scrape_counts_requests_tokens_steps_and_the_pool(engines):
    engine = engines["qwen2_vl"]
    registry = CollectorRegistry()
    core = EngineCore(engine.adapter)
    metrics = EngineMetrics(core, registry, "tiny-qwen")
    loop = EngineLoop(core, on_output=metrics.observe_output)
    prompts = [engine.vision.encode([make_image(80 + i)], "What is it?") for i in range(3)]
    requests = [CoreRequest(f"r{i}", p, PruningConfig(budget=8), SamplingConfig(max_new_tokens=5, ignore_eos=True)) for i, p in enumerate(prompts)]
    streams = [loop.submit(r) for r in requests]
    outputs = [list(s) for s in streams]
    loop.stop()
    got = scrape(registry)
    assert got[("dartserve:generation_tokens_total", ())] == 15
    assert got[("dartserve:prompt_tokens_total", ())] == sum(len(p.input_ids) for p in prompts)
    assert got[("dartserve:vision_tokens_kept_total", ())] == 24
    assert got[("dartserve:vision_tokens_total", ())] == sum(p.num_vision_tokens for p in prompts)
    assert got[("dartserve:time_to_first_token_seconds_count", ())] == 3
    assert got[("dartserve:inter_token_latency_seconds_count", ())] == 12
    assert got[("dartserve:e2e_request_latency_seconds_count", ())] == 3
    assert got[("dartserve:request_queue_time_seconds_count", ())] == 3
    assert got[("dartserve:decode_batch_size_sum", ())] == 12  # every decoded token once
    assert got[("dartserve:prefill_tokens_per_step_sum", ())] == sum(len(p.input_ids) for p in prompts)
    assert got[("dartserve:num_requests_running", ())] == got[("dartserve:num_requests_waiting", ())] == 0
    assert got[("dartserve:kv_cache_usage_perc", ())] == 0
    assert got[("dartserve:kv_cache_usage_perc_by_layer_group", (("layer_group", "from_k"),))] == 0
    assert all(o[-1].finished for o in outputs)


def test_the_pool_gauges_show_running_requests_by_layer_group(engines):
    engine = engines["llava"]
    registry = CollectorRegistry()
    core = EngineCore(engine.adapter)
    EngineMetrics(core, registry, "tiny-llava")
    core.add_request(CoreRequest("r", engine.vision.encode([make_image(90)], "What is it?"), PruningConfig(budget=4, layer=1), SamplingConfig(max_new_tokens=50, ignore_eos=True)))
    core.step()
    got = scrape(registry)
    below, above = (got[("dartserve:kv_cache_usage_perc_by_layer_group", (("layer_group", g),))] for g in ("below_k", "from_k"))
    assert got[("dartserve:num_requests_running", ())] == 1
    assert 0 < above < below * 3 and got[("dartserve:kv_cache_usage_perc", ())] == below + above  # 1 layer full, 3 pruned
