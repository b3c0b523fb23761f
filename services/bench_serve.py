"""``dartserve bench serve``: the service under closed-loop load, against the engine alone on the
same requests, in the same run.

It starts the service itself, as a user would: embedded (``dartserve serve``) or, with
``distributed``, the three stages and the gateway with a private Redis. ``concurrency``
clients each send a request to the OpenAI-compatible endpoint, streaming (so time to first
token and inter-token latency are measured at the client), and send the next when it is
answered. The engine alone answers the same requests at the same concurrency in this
process, from the same image bytes (decoded, encoded, prefilled and decoded), while the
service idles. The two take turns, so the machine's drift over the run weighs on both alike:
request by request at one client, run by run at more (``runs`` of each, medians reported).
Workloads, as ``bench engine``'s:

- ``decode``: a servable checkpoint of the LLaVA-shaped random model (the demo model's
  tokenizer, processor and vision tower with a wide language model, ``bench.servable_checkpoint``),
  demo images and questions, DART keeping 64 of 576 at K=2, 64 new tokens with EOS ignored;
- ``demo``: the bundled model on the demo task's test questions, a new image each, with the
  server's default pruning, up to 8 new tokens;
- ``describe``: the bundled model asked to describe test pictures, with the server's default
  pruning, up to 48 new tokens; its rows also give the share of the service's descriptions
  that list the objects right.

The distributed rows also give each process's memory and the design's floor on this machine
(``services.bench_floor``: three bare gRPC calls in turn and the image tokens through Redis).
"""

from __future__ import annotations

import base64
import functools
import json
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from dartserve.bench import cpu_name, servable_checkpoint
from dartserve.bench_engine import closed_loop, percentile
from dartserve.checks import MAX_PIXELS
from dartserve.defaults import DEFAULT_PRUNING
from services.bench import png, resident_mb, wait_ready
from services.bench_floor import measure_floor
from services.processes import BenchRun, free_port

WORKLOADS = ("decode", "demo", "describe")
CACHE = Path.home() / ".cache" / "dartserve"


@dataclass
class Workload:
    name: str
    model: str
    items: list[tuple[bytes, str]]  # an image file and a question
    pruning: dict
    max_tokens: int
    ignore_eos: bool
    score: Callable[[list[str]], float] | None = None  # the share of right answers, from their texts


def workload(name: str, requests: int | None, width: int, depth: int) -> Workload:
    from dartserve.demo import CHECKPOINT
    from dartserve.demo.data import describe_examples, descriptions_right, example
    from dartserve.evaluation import DESCRIPTION_TOKENS

    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    if name == "decode":
        items = [example("test", i) for i in range(requests or 32)]
        model = str(servable_checkpoint(width, depth, CACHE))
        return Workload(name, model, [(png(e.image), e.question) for e in items], {"method": "dart", "budget": 64, "layer": 2}, 64, True)
    if name == "describe":
        examples = describe_examples("test", requests or 32)
        items = [(png(e.image), e.question) for e in examples]
        score = functools.partial(descriptions_right, examples=examples)
        return Workload(name, str(CHECKPOINT), items, dict(DEFAULT_PRUNING), DESCRIPTION_TOKENS, False, score)
    items = [example("test", i) for i in range(requests or 64)]
    return Workload(name, str(CHECKPOINT), [(png(e.image), e.question) for e in items], dict(DEFAULT_PRUNING), 8, False)


@dataclass
class Answered:
    text: str
    tokens: int
    e2e_s: float
    ttft_s: float
    itl_s: list[float]


def chat(client: httpx.Client, url: str, model: str, load: Workload, item: tuple[bytes, str]) -> Answered:
    """One streamed chat completion, timed at the client."""
    image, question = item
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}, {"type": "text", "text": question}]
    body = {
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": load.max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "pruning": load.pruning, "ignore_eos": load.ignore_eos,
    }
    sent = time.perf_counter()
    texts, times, tokens = [], [], 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"the service answered {reply.status_code}: {reply.read().decode()[:300]}")
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    texts.append(choice["delta"]["content"])
                    times.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    done = time.perf_counter()
    return Answered("".join(texts).strip(), tokens, done - sent, (times[0] if times else done) - sent, [b - a for a, b in zip(times, times[1:])])


class EngineAlone:
    """The engine in this process, answering the workload's requests from their image bytes."""

    def __init__(self, load: Workload) -> None:
        from dartserve.engine import Engine

        self.load = load
        self.engine = Engine.load(load.model)

    def answer(self, item: tuple[bytes, str]) -> Answered:
        from dartserve.engine.requests import CoreRequest
        from dartserve.models.decode import SamplingConfig
        from dartserve.pruning.config import PruningConfig
        from dartserve.stages import open_image

        image, question = item
        sent = time.perf_counter()
        prompt = self.engine.vision.encode([open_image(image, MAX_PIXELS)], question)
        sampling = SamplingConfig(max_new_tokens=self.load.max_tokens, ignore_eos=self.load.ignore_eos)
        request = CoreRequest(uuid.uuid4().hex, prompt, PruningConfig.from_dict(self.load.pruning), sampling)
        tokens, times = [], []
        for output in self.engine.loop.submit(request):
            tokens += output.tokens
            times.append(time.perf_counter())
        done = time.perf_counter()
        text = self.engine.generator.detokenize(tokens).strip()
        return Answered(text, len(tokens), done - sent, times[0] - sent, [b - a for a, b in zip(times, times[1:])])

    def close(self) -> None:
        self.engine.loop.stop()


def figures(answers: list[Answered], seconds: float) -> dict:
    itl = [gap for a in answers for gap in a.itl_s]
    return {
        "request_throughput": round(len(answers) / seconds, 3),
        "output_throughput": round(sum(a.tokens for a in answers) / seconds, 3),
        "ttft_p50_ms": round(percentile([a.ttft_s for a in answers], 0.5) * 1e3, 3),
        "ttft_p95_ms": round(percentile([a.ttft_s for a in answers], 0.95) * 1e3, 3),
        "itl_p50_ms": round(percentile(itl, 0.5) * 1e3, 3),
        "itl_p95_ms": round(percentile(itl, 0.95) * 1e3, 3),
        "e2e_p50_ms": round(percentile([a.e2e_s for a in answers], 0.5) * 1e3, 3),
        "e2e_p95_ms": round(percentile([a.e2e_s for a in answers], 0.95) * 1e3, 3),
    }


def run_serve_bench(
    workloads: tuple[str, ...] = WORKLOADS,
    concurrencies: tuple[int, ...] = (1, 4, 16),
    distributed: bool = False,
    requests: int | None = None,
    width: int = 1024,
    depth: int = 8,
    threads: int | None = None,
    floor_rounds: int = 100,
    runs: int = 3,
) -> list[dict]:
    mode = "distributed" if distributed else "embedded"
    rows = []
    for name in workloads:
        load = workload(name, requests, width, depth)
        alone = EngineAlone(load)
        try:
            served, engine, solo, extra = _serve(load, alone, concurrencies, distributed, threads, floor_rounds, runs)
        finally:
            alone.close()
        engine_ms = statistics.median(a.e2e_s for a in solo) * 1e3
        for concurrency in concurrencies:
            measured = [figures(answers, seconds) for answers, seconds in served[concurrency]]
            row = {"workload": name, "mode": mode, "concurrency": concurrency, "requests": len(load.items), "runs": len(measured)}
            row |= {key: round(statistics.median(m[key] for m in measured), 3) for key in measured[0]}
            row["engine_output_throughput"] = round(statistics.median(figures(a, s)["output_throughput"] for a, s in engine[concurrency]), 3)
            row["engine_ms"] = round(engine_ms, 3)
            row["served_vs_engine"] = round(row["output_throughput"] / row["engine_output_throughput"], 3)
            row["e2e_p50_vs_engine_ms"] = round(row["e2e_p50_ms"] / engine_ms, 3)
            row["exact"] = all([a.text for a in answers] == [a.text for a in solo] for answers, _ in served[concurrency])
            if load.score is not None:
                row["answers_right"] = round(load.score([a.text for a in served[concurrency][0][0]]), 4)
            rows.append(row | extra | {"machine": f"{cpu_name()}, torch threads per process: {threads or 'all cores'}"})
    return rows


def _serve(load: Workload, alone: EngineAlone, concurrencies: tuple[int, ...], distributed: bool, threads: int | None, floor_rounds: int, runs: int):
    """The service's and the engine's runs at each concurrency, as ``(answers, seconds)``, the
    engine's answers one at a time, and the rows' extras (memory, the design floor). The two take
    turns, so the machine's drift over the run weighs on both alike: request by request at one
    client, run by run (``runs`` of each) at more; the service idles while the engine runs."""
    with BenchRun(load.model, threads) as run:
        if distributed:
            cluster = run.distributed()
            url, processes = cluster.url, cluster.processes
            wait_ready(url, processes["gateway"])
        else:
            port = free_port()
            processes = {"serve": run.dartserve("serve", {"DARTSERVE_PORT": str(port)})}
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, processes["serve"])
        with httpx.Client(timeout=600) as client:
            model = client.get(f"{url}/v1/models").json()["data"][0]["id"]
            send = lambda item: chat(client, url, model, load, item)  # noqa: E731
            served, engine, solo = {}, {}, []
            closed_loop(alone.answer, load.items[:2], 1)  # warm-up
            for concurrency in concurrencies:
                closed_loop(send, load.items[:2], min(2, concurrency))  # warm-up
                if concurrency == 1:
                    answers = []
                    for i, item in enumerate(load.items):  # who goes first alternates: neither inherits the other's wake-ups
                        if i % 2:
                            solo.append(alone.answer(item))
                            answers.append(send(item))
                        else:
                            answers.append(send(item))
                            solo.append(alone.answer(item))
                    served[1], engine[1] = [(answers, _seconds(answers))], [(solo, _seconds(solo))]
                    continue
                served[concurrency], engine[concurrency] = [], []
                for _ in range(runs):
                    served[concurrency].append(closed_loop(send, load.items, concurrency))
                    engine[concurrency].append(closed_loop(alone.answer, load.items, concurrency))
            solo = solo or [alone.answer(item) for item in load.items]
            extra = {"memory_mb": {role: resident_mb(p.pid) for role, p in processes.items() if role != "redis"}}
            if distributed:
                extra["design_floor"] = _floor(client, url, load, run.redis_url, floor_rounds)
    return served, engine, solo, extra


def _seconds(answers: list[Answered]) -> float:
    """The time answers one at a time took, back to back: their end-to-end times summed (the
    other side's turns in between are not counted)."""
    return sum(a.e2e_s for a in answers)


def _floor(client: httpx.Client, url: str, load: Workload, redis_url: str, rounds: int) -> dict:
    """The design's floor with each stage's work as the service reported it for a request."""
    image, question = load.items[0]
    body = {"image": base64.b64encode(image).decode(), "question": question, "max_new_tokens": load.max_tokens, "pruning": load.pruning}
    timings = [client.post(f"{url}/v1/answer", json=body).json()["timings"] for _ in range(5)]
    work = {stage: statistics.median(t[key] for t in timings) for stage, key in (("vision", "encode_ms"), ("pruner", "prefill_ms"), ("generator", "decode_ms"))}
    return measure_floor(redis_url, work, token_bytes=576 * 4 * _width(load.model), rounds=rounds)


def _width(model: str) -> int:
    return json.loads((Path(model) / "config.json").read_text())["text_config"]["hidden_size"]
