"""``dartserve bench engine``: the engine core under closed-loop load, at several concurrencies.

``concurrency`` clients each submit a request, read its tokens as they come, and submit the
next when it is done, until the workload's requests are answered. Workloads:

- ``decode``: the LLaVA-shaped random model of ``bench prefill`` (``--width``, ``--depth``),
  576 vision tokens per request (each its own random image and question), DART keeping 64 at
  K=2, 64 new tokens with EOS ignored;
- ``demo``: the bundled model on the demo task's test questions, with the server's default
  pruning, greedy, up to 8 new tokens;
- ``describe``: the bundled model asked to describe test pictures, with the server's default
  pruning, greedy, up to 48 new tokens (a sentence per picture: the bundled decode workload);
  its rows also give the share of descriptions that list the objects right.

Prompts are encoded before the clock starts: this measures the core. Every setting runs
``runs`` times and reports medians; ``exact`` says whether every answer equals the request's
answer at concurrency 1. For the decode workload the rows also give the ceiling (the
workload's FLOPs per output token against this machine's matmul rate, measured in the same
run), the roofline at the row's concurrency (each decode step bound by the matmul rate or by
the memory bandwidth, also measured, whichever binds: the weights are read once per step
whatever its batch, so this is what batching can gain here), and how many requests a pool
sized for ``--pool-requests`` unpruned prompts holds with DART-64 (counted by admitting
prompts into it, and seen in a run at full concurrency).
"""

from __future__ import annotations

import functools
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dartserve.bench import bench_model, bench_prompt, cpu_name
from dartserve.engine.core import CoreConfig, EngineCore, StepLog
from dartserve.engine.cpu_linear import onednn_linears
from dartserve.engine.loop import EngineLoop
from dartserve.engine.requests import CoreRequest, RequestState
from dartserve.kv.pool import KVPool
from dartserve.models.base import EncodedPrompt, ModelAdapter
from dartserve.models.decode import SamplingConfig
from dartserve.pruning.config import DEFAULT_PRUNING, PruningConfig
from dartserve.timing import stopwatch

WORKLOADS = ("decode", "demo", "describe")


@dataclass
class Workload:
    name: str
    adapter: ModelAdapter
    prompts: list[EncodedPrompt]
    pruning: PruningConfig
    sampling: SamplingConfig
    score: Callable[[list[str]], float] | None = None  # the share of right answers, from their texts
    detokenize: Callable[[list[int]], str] | None = None


def decode_workload(requests: int, width: int, depth: int, device: str, dtype: torch.dtype) -> Workload:
    adapter = bench_model(width, depth, device, dtype)
    prompts = [bench_prompt(adapter, seed) for seed in range(requests)]
    return Workload("decode", adapter, prompts, PruningConfig(method="dart", budget=64, layer=2), SamplingConfig(max_new_tokens=64, ignore_eos=True))


def demo_workload(requests: int, device: str, dtype: torch.dtype | None) -> Workload:
    from dartserve.demo import default_model
    from dartserve.engine import Engine
    from dartserve.evaluation import synthetic_items

    engine = Engine.load(default_model(), device=device, dtype=dtype)
    prompts = [engine.vision.encode([item.load_image()], item.question) for item in synthetic_items("test", requests)]
    return Workload("demo", engine.adapter, prompts, PruningConfig(**DEFAULT_PRUNING), SamplingConfig(max_new_tokens=8))


def describe_workload(requests: int, device: str, dtype: torch.dtype | None) -> Workload:
    from dartserve.demo import default_model
    from dartserve.demo.data import describe_examples, descriptions_right
    from dartserve.engine import Engine
    from dartserve.evaluation import DESCRIPTION_TOKENS

    engine = Engine.load(default_model(), device=device, dtype=dtype)
    examples = describe_examples("test", requests)
    prompts = [engine.vision.encode([e.image], e.question) for e in examples]
    sampling = SamplingConfig(max_new_tokens=DESCRIPTION_TOKENS)
    score = functools.partial(descriptions_right, examples=examples)
    return Workload("describe", engine.adapter, prompts, PruningConfig(**DEFAULT_PRUNING), sampling, score, engine.generator.detokenize)


@dataclass
class Run:
    answers: list[list[int]]
    elapsed_s: float
    ttft_s: list[float]
    itl_s: list[float]


def closed_loop(answer, items: list, concurrency: int) -> tuple[list, float]:
    """``concurrency`` clients call ``answer`` on the items in turn, each taking the next when
    its last is answered; the answers in the items' order, and the seconds it took."""
    answers: list = [None] * len(items)
    todo, lock, errors = iter(range(len(items))), threading.Lock(), []

    def client() -> None:
        while True:
            with lock:
                index = next(todo, None)
            if index is None:
                return
            try:
                answers[index] = answer(items[index])
            except Exception as error:  # noqa: BLE001 - raised once every client has stopped
                errors.append(error)

    clients = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    if errors:
        raise errors[0]
    return answers, time.perf_counter() - started


def core_run(loop: EngineLoop, workload: Workload, concurrency: int) -> Run:
    """The workload's requests through the engine core by ``concurrency`` clients, timed."""

    def answer(prompt: EncodedPrompt) -> tuple[list[int], list[float]]:
        request = CoreRequest(uuid.uuid4().hex, prompt, workload.pruning, workload.sampling)
        tokens, times = [], [time.perf_counter()]
        for output in loop.submit(request):
            if output.error is not None:
                raise output.error
            if output.tokens:
                tokens += output.tokens
                times.append(time.perf_counter())
        return tokens, times

    answered, elapsed = closed_loop(answer, workload.prompts, concurrency)
    gaps = [[b - a for a, b in zip(times, times[1:])] for _, times in answered]
    return Run([tokens for tokens, _ in answered], elapsed, [g[0] for g in gaps if g], [x for g in gaps for x in g[1:]])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def measure(workload: Workload, concurrency: int, runs: int, config: CoreConfig, solo: list[list[int]] | None) -> tuple[dict, list[list[int]]]:
    log = StepLog()
    loop = EngineLoop(EngineCore(workload.adapter, config, observers=(log,)))
    core = loop.core
    core_run(loop, Workload(workload.name, workload.adapter, workload.prompts[:2], workload.pruning, workload.sampling), min(2, concurrency))  # warm-up
    figures, exact, answers = [], True, None
    for _ in range(runs):
        log.steps.clear()
        core.pool.peak_used = core.pool.num_used
        run = core_run(loop, workload, concurrency)
        answers = run.answers
        exact &= solo is None or run.answers == solo
        tokens = sum(map(len, run.answers))
        decoding = [b for b in log.decode_batch if b]
        figures.append(
            {
                "request_throughput": len(run.answers) / run.elapsed_s,
                "output_throughput": tokens / run.elapsed_s,
                "ttft_p50_ms": percentile(run.ttft_s, 0.5) * 1e3,
                "ttft_p95_ms": percentile(run.ttft_s, 0.95) * 1e3,
                "itl_p50_ms": percentile(run.itl_s, 0.5) * 1e3,
                "itl_p95_ms": percentile(run.itl_s, 0.95) * 1e3,
                "mean_decode_batch": statistics.mean(decoding) if decoding else 0.0,
                "max_running": log.max_running,
                "kv_pool_peak_bytes": core.pool.peak_used * KVPool.block_bytes(core.pool.block_size, *core.pool.keys.shape[2:], core.pool.keys.dtype),
            }
        )
    loop.stop()
    row = {"workload": workload.name, "concurrency": concurrency, "requests": len(workload.prompts), "runs": runs}
    row |= {name: round(statistics.median(f[name] for f in figures), 3) for name in figures[0]}
    row["exact"] = exact
    return row, answers


def matmul_gflops(width: int, device: str, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """The rate of a prefill-sized product (2048 tokens through an MLP projection) on this
    machine, run as the core runs its linear layers."""
    x = torch.randn(2048, width, device=device, dtype=dtype)
    layer = torch.nn.Linear(width, int(width * 2.6875), bias=False, device=device, dtype=dtype)
    onednn_linears(layer)
    flops = 2 * x.shape[0] * layer.in_features * layer.out_features
    with torch.inference_mode():
        layer(x).sum().item()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            layer(x).sum().item()
            count += 1
    return flops * count / (time.perf_counter() - started) / 1e9


def memory_gbps(device: str, megabytes: int = 512, passes: int = 5) -> float:
    """The rate at which this machine reads memory: a sum over a tensor larger than any cache,
    the median of ``passes``."""
    data = torch.ones(megabytes << 18, device=device)
    times: list[float] = []
    for _ in range(passes + 1):
        with stopwatch(data.device, times):
            data.sum()
    return data.numel() * data.element_size() / statistics.median(times[1:]) / 1e9


@dataclass
class WorkloadCost:
    """What one request of a workload costs the machine: FLOPs (multiply-adds x2) and bytes read.
    Its prefill gives the first token; each of ``decode_steps`` steps gives one more."""

    new_tokens: int
    prefill_flops: float  # the weights of every layer for each token it holds there, causal attention, the LM head
    step_flops: float  # a decode step's, for this request: weights, attention over its cache, the LM head (mean)
    weight_bytes: float  # the weights a decode step reads, whatever its batch
    kv_bytes: float  # the request's keys and values a decode step reads (mean)

    @property
    def decode_steps(self) -> int:
        return self.new_tokens - 1

    def ceiling(self, gflops: float) -> float:
        """Output tokens per second were every FLOP run at the machine's matmul rate."""
        return gflops * 1e9 * self.new_tokens / (self.prefill_flops + self.decode_steps * self.step_flops)

    def roofline(self, concurrency: int, gflops: float, gbps: float) -> float:
        """Output tokens per second with ``concurrency`` requests decoding together, each step as
        fast as the machine's matmul rate or memory bandwidth allows, whichever binds it, and each
        prefill too (a long prompt's is compute-bound, whatever the concurrency)."""
        step_s = max((self.weight_bytes + concurrency * self.kv_bytes) / (gbps * 1e9), concurrency * self.step_flops / (gflops * 1e9))
        prefill_s = max(self.prefill_flops / (gflops * 1e9), self.weight_bytes / (gbps * 1e9))
        request_s = prefill_s + self.decode_steps * step_s / concurrency
        return self.new_tokens / request_s


def workload_cost(workload: Workload) -> WorkloadCost:
    adapter, prompt = workload.adapter, workload.prompts[0]
    linears = [m.weight for m in adapter.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    per_token = 2 * sum(w.numel() for w in linears)
    text = adapter.text.config
    hidden, depth = text.hidden_size, adapter.num_layers
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    kv_width = 2 * text.num_key_value_heads * head_dim * adapter.dtype.itemsize  # a token's key and value in one layer
    full = len(prompt.input_ids)
    kept = full - prompt.num_vision_tokens + workload.pruning.total_budget(prompt.num_vision_tokens)
    cut, new = workload.pruning.layer, workload.sampling.max_new_tokens
    lengths = [full if i < cut else kept for i in range(depth)]
    cached = sum(lengths) + depth * (new - 2) / 2  # tokens attended over the layers, mean over the decode steps
    head = adapter.lm_head.weight
    return WorkloadCost(
        new_tokens=new,
        prefill_flops=sum(per_token * n + 2 * hidden * n * n for n in lengths) + 2 * head.numel(),  # QK and AV over a causal square
        step_flops=depth * per_token + 4 * hidden * cached + 2 * head.numel(),
        weight_bytes=depth * sum(w.numel() * w.element_size() for w in linears) + head.numel() * head.element_size(),
        kv_bytes=kv_width * cached,
    )


def pool_capacity(workload: Workload, unpruned: int, block_size: int) -> dict:
    """How many prompts of the workload a pool sized for ``unpruned`` unpruned ones holds, pruned
    as the workload prunes them, counted by admitting them into it; and the token-count bound."""
    adapter, prompt = workload.adapter, workload.prompts[0]
    text = adapter.text.config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    block_bytes = KVPool.block_bytes(block_size, text.num_key_value_heads, head_dim, adapter.dtype)
    full = len(prompt.input_ids)
    blocks = unpruned * adapter.num_layers * -(-full // block_size)
    kv_cache_mb = (blocks + 1) * block_bytes / 2**20

    def admitted(pruning: PruningConfig) -> int:
        core = EngineCore(adapter, CoreConfig(kv_cache_mb=kv_cache_mb, block_size=block_size))
        count = 0
        while True:
            state = RequestState(CoreRequest(str(count), prompt, pruning), adapter.num_layers)
            if not core.kv.grow(state.layout, state.target_lengths()):
                return count
            count += 1

    kept = full - prompt.num_vision_tokens + workload.pruning.total_budget(prompt.num_vision_tokens)
    depth, cut = adapter.num_layers, workload.pruning.layer
    bound = depth * full / (cut * full + (depth - cut) * kept) * unpruned
    pruned = admitted(workload.pruning)
    return {
        "kv_cache_mb": round(kv_cache_mb, 3),
        "unpruned_requests": admitted(PruningConfig(method="none")),
        "pruned_requests": pruned,
        "pruned_bound": round(bound, 2),
        "pruned_of_bound": round(pruned / bound, 3),
    }


def run_engine_bench(
    workloads: tuple[str, ...] = ("decode",),
    concurrencies: tuple[int, ...] = (1, 4, 16),
    runs: int = 3,
    requests: int | None = None,
    width: int = 1024,
    depth: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: CoreConfig = CoreConfig(),
    pool_requests: int = 8,
) -> list[dict]:
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    machine = f"{device}: {torch.cuda.get_device_name() if device.startswith('cuda') else cpu_name()}, {torch.get_num_threads()} threads"
    rows = []
    for name in workloads:
        if name == "decode":
            workload = decode_workload(requests or 32, width, depth, device, dtype)
        elif name == "demo":
            workload = demo_workload(requests or 64, device, None if dtype == torch.float32 else dtype)
        else:
            workload = describe_workload(requests or 32, device, None if dtype == torch.float32 else dtype)
        solo = None
        measured = []
        for concurrency in sorted(set(concurrencies) | {1}):
            row, answers = measure(workload, concurrency, runs if concurrency in concurrencies else 1, config, solo)
            solo = solo or answers
            if concurrency in concurrencies:
                measured.append(row)
        extra = {"machine": machine, "dtype": str(workload.adapter.dtype).removeprefix("torch.")}
        if workload.score is not None:
            extra["answers_right"] = round(workload.score([workload.detokenize(tokens) for tokens in solo]), 4)
        limits = None  # the machine's rates and the workload's cost, for the decode workload
        if name == "decode":
            limits = rate, gbps, cost = matmul_gflops(width, device, dtype), memory_gbps(device), workload_cost(workload)
            capacity = pool_capacity(workload, pool_requests, config.block_size)
            everyone = len(workload.prompts)
            full_log = StepLog()
            full_pool = EngineLoop(EngineCore(workload.adapter, CoreConfig(capacity["kv_cache_mb"], config.block_size, max(config.max_num_batched_tokens, everyone), everyone), (full_log,)))
            core_run(full_pool, workload, everyone)
            full_pool.stop()
            extra |= {"width": width, "depth": depth, "matmul_gflops": round(rate, 1), "memory_gbps": round(gbps, 1), "ceiling_output_throughput": round(cost.ceiling(rate), 2)}
            extra |= {"pool_" + key: value for key, value in capacity.items()} | {"pool_max_running_pruned": full_log.max_running}
        baseline = next((r["output_throughput"] for r in measured if r["concurrency"] == 1), None)
        for row in measured:
            row |= extra
            if baseline:
                row["output_throughput_vs_concurrency_1"] = round(row["output_throughput"] / baseline, 3)
            if limits:
                rate, gbps, cost = limits
                roofline = cost.roofline(row["concurrency"], rate, gbps)
                row["of_ceiling"] = round(row["output_throughput"] / row["ceiling_output_throughput"], 3)
                row["roofline_output_throughput"] = round(roofline, 2)
                row["of_roofline"] = round(row["output_throughput"] / roofline, 3)
                row["roofline_vs_roofline_1"] = round(roofline / cost.roofline(1, rate, gbps), 3)
                if baseline:  # the most any concurrency can gain over one request at a time here
                    row["ceiling_vs_concurrency_1"] = round(row["ceiling_output_throughput"] / baseline, 3)
        rows += measured
    return rows
