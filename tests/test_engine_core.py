"""The engine core: requests batched continuously over the KV pool give what they give alone,
and what the masked reference gives, in every model family; the pool's accounting holds."""

import os
import threading
import time

import pytest
import torch

from dartserve.engine.core import CoreConfig, EngineCore, StepLog
from dartserve.engine import cpu_linear
from dartserve.engine.cpu_linear import OneDnnLinear, onednn_linears
from dartserve.engine.loop import EngineLoop
from dartserve.engine.requests import CoreRequest
from dartserve.kv.pool import KVPool
from dartserve.models import SamplingConfig
from dartserve.pruning import PruningConfig, available_methods
from dartserve.pruning.registry import method_spec
from reference import masked_reference
from tiny_checkpoints import FAMILIES, make_image

ATOL = 1e-4
STEPS = 5


def sampling(tokens, **kwargs):
    return SamplingConfig(max_new_tokens=tokens, ignore_eos=True, **kwargs)


def mixed(engine) -> list[CoreRequest]:
    """Requests that differ in every way a request can: images and their number, prompt,
    method, amount, layer K, answer length and sampling."""
    encode = engine.vision.encode
    return [
        CoreRequest("dart-k2", encode([make_image(20)], "What colour dominates?"), PruningConfig(budget=10, layer=2), sampling(6), keep_logits=True),
        CoreRequest("fastv-k1", encode([make_image(21, (120, 64)), make_image(22)], "Compare the two images in detail please."), PruningConfig(method="fastv", ratio=0.3, layer=1), sampling(4), keep_logits=True),
        CoreRequest("none", encode([make_image(23, (64, 112))], "Is it dark?"), PruningConfig(method="none"), sampling(7, temperature=0.9, top_p=0.8, seed=7), keep_logits=True),
        CoreRequest("pooling-k3", encode([make_image(24)], "Where is the largest block?"), PruningConfig(method="pooling", budget=9, layer=3), sampling(5), keep_logits=True),
        CoreRequest("random-k2", encode([make_image(25), make_image(26, (80, 96))], "Two pictures: which is brighter?"), PruningConfig(method="random", budget=12, layer=2, seed=3), sampling(8), keep_logits=True),
        CoreRequest("dart-k1", encode([make_image(27)], "Describe every coloured block you can see, one after another."), PruningConfig(budget=20, layer=1), sampling(3, temperature=1.3, seed=11), keep_logits=True),
    ]


def run(core: EngineCore, requests: list[CoreRequest], arrivals: list[int] | None = None) -> dict:
    """Steps the core until every request is done, adding request i before step ``arrivals[i]``;
    returns each request's outputs, in order."""
    arrivals = arrivals or [0] * len(requests)
    queue = sorted(zip(arrivals, range(len(requests))))
    outputs = {r.request_id: [] for r in requests}
    step = 0
    while queue or core.has_work:
        while queue and queue[0][0] <= step:
            core.add_request(requests[queue.pop(0)[1]])
        for output in core.step():
            outputs[output.request_id].append(output)
        step += 1
    return outputs


def tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.tokens]


def logits(outputs) -> torch.Tensor:
    return torch.stack([l for o in outputs for l in o.logits])


def alone(engine, request: CoreRequest, **config):
    return run(EngineCore(engine.adapter, CoreConfig(**config)), [request])[request.request_id]


def assert_same(got, want):
    assert tokens(got) == tokens(want)
    assert got[0].kept_positions == want[0].kept_positions and want[0].kept_positions
    torch.testing.assert_close(logits(got), logits(want), atol=ATOL, rtol=0)


@pytest.mark.parametrize("budget", [4096, 24], ids=["whole-prompts", "chunked-prompts"])
def test_requests_joining_a_running_batch_give_what_they_give_alone(engine, budget):
    requests = mixed(engine)
    solo = {r.request_id: alone(engine, r) for r in requests}
    log = StepLog()
    core = EngineCore(engine.adapter, CoreConfig(max_num_batched_tokens=budget, max_num_seqs=8), observers=(log,))
    together = run(core, requests, arrivals=[0, 0, 1, 2, 3, 5])
    for request in requests:
        assert_same(together[request.request_id], solo[request.request_id])
    assert max(log.decode_batch) >= (4 if budget > 24 else 2)  # they did run together
    if budget == 24:
        assert any(d and p for d, p in zip(log.decode_batch, log.prefill_tokens))  # chunks beside decodes
    assert core.pool.num_used == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_on_onednn_linears_requests_joining_a_running_batch_give_what_they_give_alone(checkpoints, monkeypatch, family):
    """The tiny models' weights are below the size oneDNN takes; here every linear runs on it."""
    from dartserve.engine import Engine

    monkeypatch.setattr(cpu_linear, "ONEDNN_MIN_WEIGHT", 0)
    engine = Engine.load(str(checkpoints[family]))
    try:
        requests = mixed(engine)
        solo = {r.request_id: alone(engine, r) for r in requests}
        assert type(engine.adapter.lm_head) is OneDnnLinear
        together = run(EngineCore(engine.adapter, CoreConfig(max_num_seqs=8)), requests, arrivals=[0, 0, 1, 2, 3, 5])
        for request in requests:
            assert_same(together[request.request_id], solo[request.request_id])
    finally:
        engine.loop.stop()


METHODS = [m for m in available_methods() if m != "none"]


@pytest.mark.parametrize("layer", [0, 2], ids=["before-the-llm", "at-k2"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("images", [1, 2], ids=["one-image", "two-images"])
def test_the_core_equals_the_masked_reference(engine, method, images, layer):
    if layer == 0 and method_spec(method).needs_attention:
        with pytest.raises(ValueError, match="cannot prune before the LLM"):
            PruningConfig(method=method, budget=10, layer=0)
        return
    adapter = engine.adapter
    prompt = engine.vision.encode([make_image(10 + i) for i in range(images)], "Describe the picture in a few words.")
    pruning = PruningConfig(method=method, budget=10 * images, layer=layer)
    outputs = alone(engine, CoreRequest("r", prompt, pruning, sampling(STEPS + 1), export_cache=True, keep_logits=True))
    ref_logits, ref_tokens, ref_kept, ref_token_mask, ref_cache = masked_reference(adapter, prompt, pruning, STEPS)

    assert outputs[0].kept_positions == ref_kept.tolist()
    assert tokens(outputs) == ref_tokens
    torch.testing.assert_close(logits(outputs), ref_logits, atol=ATOL, rtol=0)
    cache = outputs[-1].cache  # the prompt and every answer token but the last
    kept_slots = torch.cat([ref_token_mask, torch.ones(STEPS, dtype=torch.bool)])
    for layer in range(adapter.num_layers):
        want_keys, want_values = ref_cache.layers[layer].keys, ref_cache.layers[layer].values
        if layer >= pruning.layer:
            want_keys, want_values = want_keys[:, :, kept_slots], want_values[:, :, kept_slots]
        torch.testing.assert_close(cache.keys[layer], want_keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(cache.values[layer], want_values, atol=ATOL, rtol=0)
    seq = len(prompt.input_ids)
    assert cache.kept_tokens() == [seq + STEPS, seq - prompt.num_vision_tokens + 10 * images + STEPS]


def test_a_follow_up_turn_from_resident_blocks_equals_the_whole_conversation_from_scratch(engine):
    adapter = engine.adapter
    prompt = engine.vision.encode([make_image(30)], "What is in the picture?")
    pruning = PruningConfig(budget=10, layer=2)
    core = EngineCore(adapter)
    first = run(core, [CoreRequest("turn-1", prompt, pruning, sampling(4), keep="conversation", export_cache=True)])["turn-1"]
    answer = tokens(first)
    turn = adapter.turn_ids(answer[-1], "And what else is there?")
    assert core.pool.num_used > 0 and core.kv.resident_blocks == core.pool.num_used  # kept for the next turn

    resident = run(core, [CoreRequest("turn-2", parent="conversation", feed=tuple(turn), sampling=sampling(5), keep_logits=True)])["turn-2"]
    stored = alone(engine, CoreRequest("turn-2", cache=first[-1].cache, feed=tuple(turn), sampling=sampling(5), keep_logits=True))
    forced = answer[:-1] + turn
    ref_logits, ref_tokens, *_ = masked_reference(adapter, prompt, pruning, 4, forced=forced)
    assert tokens(resident) == tokens(stored) == ref_tokens[len(forced) :]
    torch.testing.assert_close(logits(resident), ref_logits[len(forced) :], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(stored), ref_logits[len(forced) :], atol=ATOL, rtol=0)
    assert core.pool.num_used == 0  # the second turn was not kept


def test_the_generator_role_continues_the_prefill_role(engine):
    """One core prefills only and hands its cache on; another decodes from it, as the pruner and
    the generator services do; together they give the answer one core gives."""
    prompt = engine.vision.encode([make_image(31)], "Name the colours.")
    pruning = PruningConfig(budget=12, layer=1)
    whole = alone(engine, CoreRequest("r", prompt, pruning, sampling(6, temperature=1.1, seed=5)))
    prefilled = alone(engine, CoreRequest("r", prompt, pruning, sampling(6, temperature=1.1, seed=5), prefill_only=True))
    assert len(prefilled) == 1 and prefilled[0].finished and len(prefilled[0].tokens) == 1
    first = prefilled[0].tokens[0]
    rest = alone(engine, CoreRequest("r", cache=prefilled[0].cache, feed=(first,), answer=(first,), sampling=sampling(6, temperature=1.1, seed=5)))
    assert [first] + tokens(rest) == tokens(whole)


def block_mb(engine, blocks: int) -> float:
    text = engine.adapter.text.config
    size = KVPool.block_bytes(16, text.num_key_value_heads, text.hidden_size // text.num_attention_heads, engine.adapter.dtype)
    return (blocks + 1) * size / 2**20


def test_a_full_pool_makes_requests_wait_preempts_when_decodes_outgrow_it_and_never_grows(engines):
    engine = engines["llava"]
    requests = [CoreRequest(f"r{i}", engine.vision.encode([make_image(40 + i)], "What is it?"), PruningConfig(method="none"), sampling(30)) for i in range(4)]
    prompt_blocks = 4 * -(-len(requests[0].prompt.input_ids) // 16)  # 4 layers
    log = StepLog()
    core = EngineCore(engine.adapter, CoreConfig(kv_cache_mb=block_mb(engine, 2 * prompt_blocks + 2)), observers=(log,))
    together = run(core, requests)
    for request in requests:
        assert tokens(together[request.request_id]) == tokens(alone(engine, request))
    assert log.max_running == 2  # two prompts fit; the others waited
    assert sum(o[-1].state.metrics.preemptions for o in together.values()) > 0  # their answers outgrew the pool
    assert core.pool.peak_used <= core.pool.num_blocks and core.pool.num_used == 0


def test_a_request_that_can_never_fit_is_refused_at_once(engines):
    engine = engines["llava"]
    prompt = engine.vision.encode([make_image(41)], "What is it?")
    core = EngineCore(engine.adapter, CoreConfig(kv_cache_mb=block_mb(engine, 8)))
    with pytest.raises(ValueError, match="KV blocks"):
        core.add_request(CoreRequest("big", prompt, PruningConfig(method="none"), sampling(4)))
    assert not core.has_work


def test_aborting_frees_blocks_and_the_others_go_on(engines):
    engine = engines["qwen2_vl"]
    requests = mixed(engine)[:3]
    core = EngineCore(engine.adapter)
    for request in requests:
        core.add_request(request)
    outputs = {r.request_id: [] for r in requests}
    for _ in range(3):
        for output in core.step():
            outputs[output.request_id].append(output)
    used = core.pool.num_used
    aborted = core.abort("fastv-k1")
    assert aborted.finished and aborted.finish_reason == "abort" and core.pool.num_used < used
    assert core.abort("fastv-k1") is None  # once only
    while core.has_work:
        for output in core.step():
            outputs[output.request_id].append(output)
    assert core.pool.num_used == 0
    for request in (requests[0], requests[2]):
        assert tokens(outputs[request.request_id]) == tokens(alone(engine, request))


def test_bad_requests_are_value_errors_and_a_lost_parent_is_an_error_output(engines):
    engine = engines["llava"]
    prompt = engine.vision.encode([make_image(42)], "What is it?")
    core = EngineCore(engine.adapter)
    for bad in (
        CoreRequest("a"),  # neither a prompt nor a cache
        CoreRequest("b", prompt, feed=(1,)),
        CoreRequest("c", parent="p", feed=(10**9,)),
        CoreRequest("d", parent="p", feed=()),
        CoreRequest("e", prompt, PruningConfig(budget=10, layer=9)),
        CoreRequest("f", prompt, sampling=SamplingConfig(max_new_tokens=4000)),
    ):
        with pytest.raises(ValueError):
            core.add_request(bad)
    core.add_request(CoreRequest("g", parent="never-kept", feed=(5,)))
    (output,) = core.step()
    assert output.finished and output.finish_reason == "error" and "no longer resident" in str(output.error)
    assert not core.has_work


def test_the_loop_serves_threads_at_once_and_aborts_a_stream(engines):
    engine = engines["llava_next"]
    requests = mixed(engine)
    loop = EngineLoop(EngineCore(engine.adapter))
    results, errors = {}, []

    def ask(request):
        try:
            results[request.request_id] = list(loop.submit(request))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for request in requests:
        assert_same(results[request.request_id], alone(engine, request))

    long = CoreRequest("long", requests[0].prompt, PruningConfig(budget=10), sampling(500))
    stream = loop.submit(long)
    stream.get(timeout=30)
    stream.abort()
    last = list(stream)[-1]
    assert last.finish_reason == "abort"
    with pytest.raises(ValueError, match="already running"):
        loop.submit(CoreRequest("twice", requests[0].prompt, sampling=sampling(400)))
        loop.submit(CoreRequest("twice", requests[0].prompt, sampling=sampling(400)))
    loop.stop()
    assert loop.core.pool.num_used == 0


def test_the_engine_bench_reports_every_figure_and_exact_answers():
    from dartserve.bench_engine import run_engine_bench

    rows = run_engine_bench(("decode", "demo", "describe"), (1, 3), runs=1, requests=6, width=128, depth=4, pool_requests=2)
    assert [(r["workload"], r["concurrency"]) for r in rows] == [(w, c) for w in ("decode", "demo", "describe") for c in (1, 3)]
    for row in rows:
        assert row["exact"] is True and row["requests"] == 6
        assert row["output_throughput"] > 0 and row["ttft_p50_ms"] <= row["ttft_p95_ms"] and row["itl_p50_ms"] <= row["itl_p95_ms"]
        assert 1 <= row["max_running"] <= row["concurrency"] and row["kv_pool_peak_bytes"] > 0
    decode = rows[1]
    assert decode["mean_decode_batch"] > 1  # three clients decode together
    assert decode["pool_unpruned_requests"] == 2 and decode["pool_pruned_requests"] > 2
    assert 0.9 <= decode["pool_pruned_of_bound"] <= 1 and decode["pool_max_running_pruned"] >= decode["pool_pruned_requests"] - 1
    assert decode["ceiling_output_throughput"] > 0 and decode["of_ceiling"] > 0
    one = rows[0]["output_throughput"]
    assert decode["ceiling_vs_concurrency_1"] == pytest.approx(decode["ceiling_output_throughput"] / one, rel=0.01)
    assert decode["memory_gbps"] > 0 and rows[0]["roofline_vs_roofline_1"] == 1
    assert rows[0]["roofline_output_throughput"] < decode["roofline_output_throughput"] <= decode["ceiling_output_throughput"]
    assert decode["of_roofline"] == pytest.approx(decode["output_throughput"] / decode["roofline_output_throughput"], rel=0.01)
    describe = rows[5]
    assert describe["output_throughput"] / describe["request_throughput"] > 12  # a sentence each: the bundled model decodes
    assert describe["answers_right"] >= 0.5


def test_the_roofline_reads_the_weights_once_per_step_and_prefills_at_the_matmul_rate():
    from dartserve.bench_engine import WorkloadCost

    # 1 GFLOP of prefill, 3 decode steps of 0.1 GFLOP, 1 GB of weights and 10 MB of cache per step
    cost = WorkloadCost(new_tokens=4, prefill_flops=1e9, step_flops=1e8, weight_bytes=1e9, kv_bytes=1e7)
    assert cost.ceiling(gflops=10) == pytest.approx(4 / 0.13)
    assert cost.roofline(1, gflops=10, gbps=10) == pytest.approx(4 / (0.1 + 3 * 0.101))  # memory-bound: weights and cache
    assert cost.roofline(4, gflops=10, gbps=10) == pytest.approx(4 / (0.1 + 3 * 0.104 / 4))
    assert cost.roofline(20, gflops=10, gbps=10) == pytest.approx(4 / (0.1 + 3 * 0.2 / 20))  # 2 GFLOP a step: compute-bound
    short = WorkloadCost(new_tokens=4, prefill_flops=1e8, step_flops=1e8, weight_bytes=1e9, kv_bytes=1e7)
    assert short.roofline(1, gflops=10, gbps=10) == pytest.approx(4 / (0.1 + 3 * 0.101))  # a short prompt reads the weights once too
    assert cost.roofline(20, gflops=10, gbps=10) < cost.ceiling(gflops=10)


def test_concurrent_encodes_share_tower_forwards_and_equal_lone_encodes(engines):
    engine = engines["llava_next"]
    adapter = engine.adapter
    calls = []

    def tower(images):
        calls.append(len(images))
        if len(calls) == 1:
            time.sleep(0.3)  # while the first forward runs, the other callers' images queue up
        return adapter.image_features_many(images)

    loop = EngineLoop(None, tower)
    images = [[make_image(50 + i, (60 + 20 * i, 80)), make_image(60 + i)] for i in range(6)]
    encoded = [None] * len(images)

    def encode(i):
        encoded[i] = adapter.encode(images[i], "What is here?", tower=loop.encode_images)

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    assert sum(calls) == 12 and len(calls) < len(images)  # several callers' images in one forward
    for pair, got in zip(images, encoded):
        want = adapter.encode(pair, "What is here?")
        assert torch.equal(got.input_ids, want.input_ids) and got.spans == want.spans
        torch.testing.assert_close(got.image_features, want.image_features, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no language model"):
        loop.submit(CoreRequest("r", encoded[0]))
    loop.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        loop.encode_images([])


def test_a_last_chunk_as_long_as_the_tokens_kept_is_still_pruned(engines):
    engine = engines["llava"]
    prompt = engine.vision.encode([make_image(70)], "What is in the picture?")
    pruning = PruningConfig(budget=4, layer=2)
    kept = len(prompt.input_ids) - prompt.num_vision_tokens + 4
    first = len(prompt.input_ids) - kept
    assert first >= kept  # two chunks: ``first`` tokens, then as many as are kept
    request = CoreRequest("r", prompt, pruning, sampling(4), keep_logits=True)
    log = StepLog()
    chunked = run(EngineCore(engine.adapter, CoreConfig(max_num_batched_tokens=first, max_num_seqs=4), (log,)), [request])["r"]
    assert log.prefill_tokens[:2] == [first, kept]
    assert_same(chunked, alone(engine, request))


@pytest.mark.parametrize("pruning", [PruningConfig(method="none"), PruningConfig(method="dart", budget=10)], ids=["none", "dart"])
def test_a_turn_fed_at_once_equals_the_turn_fed_token_by_token(engine, pruning):
    adapter = engine.adapter
    prompt = engine.vision.encode([make_image(3)], "What is shown here?")
    (prefilled,) = alone(engine, CoreRequest("r", prompt, pruning, prefill_only=True))
    turn = tuple(adapter.turn_ids(prefilled.tokens[0], "and then what colour ?"))
    request = CoreRequest("r", cache=prefilled.cache, feed=turn, sampling=sampling(3), export_cache=True, keep_logits=True)
    at_once = alone(engine, request)
    one_by_one = alone(engine, request, max_num_batched_tokens=1, max_num_seqs=1)
    assert tokens(at_once) == tokens(one_by_one)
    torch.testing.assert_close(logits(at_once), logits(one_by_one), atol=ATOL, rtol=0)
    for a, b in zip(at_once[-1].cache.keys + at_once[-1].cache.values, one_by_one[-1].cache.keys + one_by_one[-1].cache.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_onednn_linears_give_the_same_products_and_keep_weights_and_ties():
    torch.manual_seed(0)
    embed, hidden, head = torch.nn.Embedding(1024, 512), torch.nn.Linear(512, 1024), torch.nn.Linear(512, 1024, bias=False)
    head.weight = embed.weight  # tied, as small language models are
    small, wide = torch.nn.Linear(32, 8), torch.nn.Linear(512, 1024).double()
    model = torch.nn.ModuleDict({"embed": embed, "hidden": hidden, "head": head, "small": small, "wide": wide})
    x = torch.randn(1, 5, 512)
    before = (hidden(x), head(x), embed(torch.tensor([3, 7])))
    weights = {name: p.data_ptr() for name, p in model.named_parameters()}
    state = set(model.state_dict())
    onednn_linears(model)
    assert type(hidden) is OneDnnLinear and type(head) is OneDnnLinear
    assert type(small) is torch.nn.Linear and type(wide) is torch.nn.Linear  # MKL is faster on small weights; oneDNN's op is float32
    assert head.weight is embed.weight and {name: p.data_ptr() for name, p in model.named_parameters()} == weights
    assert hidden.packed.is_mkldnn and hidden.packed.shape == hidden.weight.shape and set(model.state_dict()) == state  # the packed copy is no weight of the model
    torch.testing.assert_close(hidden.packed.to_dense(), hidden.weight, atol=0, rtol=0)
    with torch.inference_mode():
        for got, want in zip((hidden(x), head(x), embed(torch.tensor([3, 7]))), before):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        for rows in (1, 2, 4, 16, 300):  # decode steps of 1 to 16 requests (one row reads the plain weight, more the packed one), and a prefill
            x = torch.randn(1, rows, 512)
            torch.testing.assert_close(hidden(x), torch.nn.functional.linear(x, hidden.weight, hidden.bias), atol=1e-4, rtol=0)
        hidden.load_state_dict({"weight": 2 * hidden.weight, "bias": hidden.bias})  # packed again at the next product
        x = torch.randn(1, 4, 512)
        torch.testing.assert_close(hidden(x), torch.nn.functional.linear(x, hidden.weight, hidden.bias), atol=1e-4, rtol=0)
    hidden(torch.randn(2, 512)).sum().backward()  # with gradients it is nn.Linear's own product
    assert hidden.weight.grad is not None and hidden.weight.grad.shape == hidden.weight.shape


def test_the_thread_that_builds_the_loop_lets_its_openmp_workers_go():
    import subprocess
    import sys

    if torch.get_num_threads() < 2 or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("one thread, or no OpenMP: no workers to let go")
    code = """
import os, time, torch
from dartserve.engine.loop import EngineLoop
threads = lambda: set(os.listdir("/proc/self/task"))
before = threads()
x = torch.randn(1024, 1024)
x @ x
workers = threads() - before
loop = EngineLoop(None)
deadline = time.monotonic() + 5
while workers & threads() and time.monotonic() < deadline:  # an exiting thread leaves the list a moment later
    time.sleep(0.01)
print(len(workers), len(workers & threads()))
loop.stop()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.split()
    workers, left = map(int, out)
    assert workers >= 1 and left == 0


def test_a_thread_that_hands_the_loop_a_request_lets_its_openmp_workers_go(engines):
    if torch.get_num_threads() < 2 or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("one thread, or no OpenMP: no workers to let go")
    engine = engines["llava"]
    request = CoreRequest("caller-workers", engine.vision.encode([make_image(0)], "What is it?"), sampling=SamplingConfig(max_new_tokens=2))
    threads = lambda: set(os.listdir("/proc/self/task"))
    seen = {}

    def caller() -> None:
        before = threads()
        x = torch.randn(1024, 1024)
        x @ x  # the caller's own work starts its workers
        seen["workers"] = threads() - before
        stream = engine.loop.submit(request)
        deadline = time.monotonic() + 5
        while seen["workers"] & threads() and time.monotonic() < deadline:  # an exiting thread leaves the list a moment later
            time.sleep(0.01)
        seen["left"] = seen["workers"] & threads()
        list(stream)

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join()
    assert seen["workers"] and not seen["left"]
