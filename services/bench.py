"""``dartserve bench service``: embedded against distributed mode on the same requests, KV
bytes pruned against unpruned, the Redis KV store against a plain redis-py pipeline, and the
distributed design's floor on this machine (``services.bench_floor``).

Every process is started here, as a user would start it, and both modes answer the same
requests taking turns, so drift on the machine reaches both alike. They are measured in their
steady state: with a short TTL, warm-up answers run until the stores drop as much as they
take, as a server does once it has run for its TTL. Before that, every answer grows the
stores by its image tokens and KV cache (2 MB on the demo model), and the fresh pages that
takes are paid by whatever touches them first: in the embedded process, the next answer's
image processing; in distributed mode, Redis, mostly while it stores the KV cache.
"""

from __future__ import annotations

import base64
import io
import os
import statistics
import subprocess
import time

import httpx
from PIL import Image

from dartserve.bench import cpu_name
from services.bench_floor import measure_floor
from services.config import DEFAULT_PRUNING
from services.processes import BenchRun, free_port, stop


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


def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], "n": len(ordered)}


def minor_faults(pid: int) -> int | None:
    """The page faults a process has taken that needed no disk read (fresh or reclaimed memory);
    None where there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[7])  # after the command name, which may hold spaces
    except OSError:
        return None


def _per_answer(after: int | None, before: int | None, answers: int) -> float | None:
    return None if after is None or before is None else (after - before) / answers


STAGE_TIMINGS = ("encode", "prefill", "decode", "kv_store")


def _stage_work(stages: list[dict], e2e_ms: list[float]) -> dict:
    beyond = [e2e - sum(work.values()) for work, e2e in zip(stages, e2e_ms)]
    return {stage: statistics.median(work[stage] for work in stages) for stage in STAGE_TIMINGS} | {"beyond_stages": statistics.median(beyond)}


def added_per_request(embedded: dict, distributed: dict) -> float:
    """The median over requests of what the distributed mode added to each, KV store time taken
    out of both. The modes answer each request in turn, so the pairs cancel what differs from
    one request to the next (its image, its answer's length) and from one minute to the next."""
    pairs = zip(distributed["e2e_ms"], distributed["kv_ms"], embedded["e2e_ms"], embedded["kv_ms"])
    return statistics.median((d - d_kv) - (e - e_kv) for d, d_kv, e, e_kv in pairs)


def demo_requests(count: int, first: int = 0) -> list[dict]:
    from dartserve.demo.data import example

    bodies = []
    for index in range(first, first + count):
        item = example("test", index)
        buffer = io.BytesIO()
        item.image.save(buffer, "PNG")
        bodies.append({"image": base64.b64encode(buffer.getvalue()).decode(), "question": item.question, "max_new_tokens": 8})
    return bodies


def loopback_round_trips(address: str, rounds: int = 100, idle_s: float = 0.02) -> dict:
    """A health check to a stage, back to back and after ``idle_s`` of silence: how much a
    process that has gone idle adds to a call on this machine before any work is done."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        times = {"back_to_back": [], "after_idle": []}
        for _ in range(rounds):
            for regime, samples in times.items():
                if regime == "after_idle":
                    time.sleep(idle_s)
                started = time.perf_counter()
                check(health_pb2.HealthCheckRequest(), timeout=5)
                samples.append((time.perf_counter() - started) * 1e3)
    return {"idle_s": idle_s, **{f"{regime}_ms_p50": statistics.median(samples) for regime, samples in times.items()}}


def _grpc_backend(ports: dict[str, int]):
    """The gateway's backend to the stages listening on ``ports`` on loopback."""
    from services.config import Settings
    from services.frontend.backends import GrpcBackend

    return GrpcBackend(Settings(**{f"{name}_addr": f"127.0.0.1:{ports[name]}" for name in ("vision", "pruner", "generator")}))


def _call_arguments(body: dict):
    """A ``/v1/answer`` body as a backend's arguments: the images, the conversation, the sampling."""
    from dartserve.models.decode import SamplingConfig

    return [base64.b64decode(body["image"])], [{"role": "user", "content": body["question"]}], SamplingConfig(max_new_tokens=body["max_new_tokens"])


def generator_calls(ports: dict[str, int], body: dict, rounds: int = 50) -> dict:
    """One answer's decode through the generator stage, streamed (``Generate``) and as one reply
    (``Complete``, what the gateway uses when the client does not stream), taking turns."""
    from dartserve.pruning import PruningConfig

    backend = _grpc_backend(ports)
    try:
        images, conversation, sampling = _call_arguments(body)
        encoded = backend.encode(images, conversation)
        prefilled = backend.prefill(encoded.prompt_ref, PruningConfig(**DEFAULT_PRUNING), sampling)
        times = {"streamed": [], "complete": []}
        for _ in range(rounds):
            for regime, samples in times.items():
                started = time.perf_counter()
                chunks = list(backend.generate(prefilled.kv_handle, sampling, prefilled.first_token, stream=regime == "streamed"))
                samples.append((time.perf_counter() - started) * 1e3)
                if regime == "streamed":
                    messages = len(chunks)
    finally:
        backend.close()
    return {"streamed_messages": messages, **{f"{regime}_ms_p50": statistics.median(samples) for regime, samples in times.items()}}


def stage_overheads(ports: dict[str, int], engine, bodies: list[dict], warmup: int = 3) -> dict:
    """What each stage call costs beyond the stage's own work: its time at the caller less the
    time the stage reports for its step and its KV store calls, p50 in ms, through gRPC and in
    this process (the embedded mode's backend on an in-memory store), taking turns."""
    from dartserve.kv.store import MemoryStore
    from dartserve.pruning import PruningConfig
    from dartserve.stages import DecodeStep, PrefillStep, VisionStep
    from services.frontend.backends import LocalBackend

    store = MemoryStore()
    backends = {
        "distributed": _grpc_backend(ports),
        "embedded": LocalBackend(VisionStep(engine, store), PrefillStep(engine, store), DecodeStep(engine, store)),
    }
    added = {mode: {"encode": [], "prefill": [], "generate": []} for mode in backends}
    try:
        for index, body in enumerate(bodies):
            images, conversation, sampling = _call_arguments(body)
            for mode, backend in backends.items():
                started = time.perf_counter()
                encoded = backend.encode(images, conversation)
                encoded_at = time.perf_counter()
                prefilled = backend.prefill(encoded.prompt_ref, PruningConfig(**DEFAULT_PRUNING), sampling, encoded.image_hashes)
                prefilled_at = time.perf_counter()
                last = None
                if not prefilled.finish_reason:  # an answer of one token has nothing to decode
                    *_, last = backend.generate(prefilled.kv_handle, sampling, prefilled.first_token, stream=False)
                if index < warmup:
                    continue
                calls = added[mode]
                calls["encode"].append((encoded_at - started) * 1e3 - encoded.encode_ms)
                calls["prefill"].append((prefilled_at - encoded_at) * 1e3 - prefilled.prefill_ms - prefilled.kv_store_ms)
                if last is not None:
                    calls["generate"].append((time.perf_counter() - prefilled_at) * 1e3 - last.decode_ms - last.kv_store_ms)
    finally:
        backends["distributed"].close()
    # None where no answer had a token to decode.
    return {call: {mode: statistics.median(added[mode][call]) if added[mode][call] else None for mode in backends} for call in ("encode", "prefill", "generate")}


def _kv_store_throughput(redis_url: str, encoded, rounds: int) -> dict:
    """Store plus load of the same encoded cache through ``RedisStore`` and a plain pipeline on
    the same client, so that the two differ only in what the store adds."""
    from dartserve.kv.store import RedisStore

    store = RedisStore.from_url(redis_url)
    client = store.client
    values = [encoded.manifest, *encoded.layers]
    keys = [f"dartserve:bench:plain:{i}" for i in range(len(values))]

    def plain_put():
        pipe = client.pipeline(transaction=False)
        for key, value in zip(keys, values):
            pipe.set(key, value, ex=60)
        pipe.execute()

    calls = {
        "store_put": lambda: store.put("dartserve:bench:store", encoded, ttl_s=60),
        "store_get": lambda: store.get("dartserve:bench:store", len(encoded.layers)),
        "plain_put": plain_put,
        "plain_get": lambda: client.mget(keys),
    }
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():  # taking turns
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    nbytes = encoded.nbytes
    p50 = {name: statistics.median(t) for name, t in times.items()}
    rates = {
        "store": 2 * nbytes / (p50["store_put"] + p50["store_get"]) / 1e6,  # written and read back
        "plain": 2 * nbytes / (p50["plain_put"] + p50["plain_get"]) / 1e6,
    }
    return {
        "kv_bytes": nbytes,
        **{f"{name}_ms_p50": value * 1e3 for name, value in p50.items()},
        "store_mb_per_s": rates["store"],
        "plain_mb_per_s": rates["plain"],
        "store_vs_plain": rates["store"] / rates["plain"],
    }


def warm_up(client: httpx.Client, urls: dict[str, str], seconds: float, first: int) -> int:
    """Answers questions on images numbered from ``first`` in both modes, taking turns, for at
    least ``seconds``; returns how many each answered."""
    started, answered = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        for body in demo_requests(10, first + answered):
            for url in urls.values():
                client.post(f"{url}/v1/answer", json=body).raise_for_status()
        answered += 10
    return answered


def run_service_bench(
    requests: int = 30,
    redis_url: str | None = None,
    kv_rounds: int = 30,
    model: str | None = None,
    threads: int | None = None,
    ttl_s: int = 10,
    floor_rounds: int = 100,
) -> dict:
    """``redis_url``: by default a private, empty redis-server. ``threads``: torch threads in
    every process (``OMP_NUM_THREADS``); by default each process takes all cores, which
    oversubscribes a small machine running five of them. ``ttl_s``: every process's
    ``DARTSERVE_TTL_S``; the warm-up lasts one and a half times as long. ``floor_rounds``:
    rounds of the design's floor (``services.bench_floor``)."""
    import torch

    from dartserve.demo import default_model
    from dartserve.engine import Engine
    from dartserve.kv import blob
    from dartserve.kv.codec import encode
    from dartserve.bench import prefill_once
    from dartserve.engine.core import EngineCore
    from dartserve.pruning import PruningConfig

    model = model or default_model()
    embedded_port = free_port()
    with BenchRun(model, threads, redis_url, {"DARTSERVE_TTL_S": str(ttl_s)}) as run:
        embedded = run.dartserve("serve", {"DARTSERVE_PORT": str(embedded_port)})
        distributed = run.distributed()
        urls = {"embedded": f"http://127.0.0.1:{embedded_port}", "distributed": distributed.url}
        wait_ready(urls["embedded"], embedded)
        wait_ready(urls["distributed"], distributed.processes["gateway"])
        bodies = demo_requests(requests)
        samples = {mode: {"ttft_ms": [], "e2e_ms": [], "kv_ms": [], "stages": [], "answers": []} for mode in urls}
        kv_bytes = {"pruned": [], "unpruned": []}
        with httpx.Client(timeout=120) as client:
            # On other images than the measured ones, which must not find their tokens cached.
            warm_up_answers = warm_up(client, urls, 1.5 * ttl_s, first=requests)
            named = {"embedded": embedded, **distributed.processes} | ({"redis": run.redis} if run.redis else {})
            faults_before = {name: minor_faults(process.pid) for name, process in named.items()}
            for body in bodies:
                for mode, url in urls.items():
                    started = time.perf_counter()
                    reply = client.post(f"{url}/v1/answer", json=body)
                    e2e = (time.perf_counter() - started) * 1e3
                    reply.raise_for_status()
                    answer = reply.json()
                    timings = answer["timings"]
                    samples[mode]["e2e_ms"].append(e2e)
                    samples[mode]["ttft_ms"].append(timings["ttft_ms"])
                    samples[mode]["kv_ms"].append(timings["kv_store_ms"])
                    samples[mode]["stages"].append({stage: timings[f"{stage}_ms"] for stage in STAGE_TIMINGS})
                    samples[mode]["answers"].append(answer["answer"])
                kv_bytes["pruned"].append(answer["usage"]["kv_bytes"])
            faults = {name: _per_answer(minor_faults(named[name].pid), before, len(bodies)) for name, before in faults_before.items()}
            for body in bodies:
                unpruned = client.post(f"{urls['distributed']}/v1/answer", json=body | {"pruning": {"method": "none"}})
                kv_bytes["unpruned"].append(unpruned.json()["usage"]["kv_bytes"])
        round_trips = loopback_round_trips(f"127.0.0.1:{distributed.ports['vision']}")
        generator = generator_calls(distributed.ports, bodies[0])
        if threads:  # this process's calls, like the services', on that many threads
            torch.set_num_threads(threads)
        engine = Engine.load(model)
        overheads = stage_overheads(distributed.ports, engine, bodies)
        stop([embedded, *distributed.processes.values()])  # the Redis measurement runs alone
        request = engine.vision.encode([Image.open(io.BytesIO(base64.b64decode(bodies[0]["image"])))], bodies[0]["question"])
        pruned_cache = prefill_once(EngineCore(engine.adapter), request, PruningConfig(**DEFAULT_PRUNING))[1].cache
        redis_kv = _kv_store_throughput(run.redis_url, encode(pruned_cache, engine.adapter.fingerprint), kv_rounds)
        stage_work = {mode: _stage_work(s["stages"], s["e2e_ms"]) for mode, s in samples.items()}
        work = stage_work["distributed"]
        image_token_bytes = len(blob.pack("features", engine.adapter.fingerprint, {"features": request.image_features}))
        floor = measure_floor(run.redis_url, {"vision": work["encode"], "pruner": work["prefill"], "generator": work["decode"]}, image_token_bytes, floor_rounds)

    modes = {mode: {"ttft_ms": _percentiles(s["ttft_ms"]), "e2e_ms": _percentiles(s["e2e_ms"])} for mode, s in samples.items()}
    added = modes["distributed"]["e2e_ms"]["p50"] - modes["embedded"]["e2e_ms"]["p50"]
    # The stages time their own KV store calls (the pruner's write, the generator's read and
    # tail write); each request's end-to-end time without them, in either mode:
    without_kv = {mode: statistics.median(e - k for e, k in zip(s["e2e_ms"], s["kv_ms"])) for mode, s in samples.items()}
    kv_transfer = statistics.median(samples["distributed"]["kv_ms"])
    return {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "threads_per_process": threads or "default",
        "model": model,
        "requests": requests,
        "ttl_s": ttl_s,
        "warm_up_answers": warm_up_answers,
        "same_answers": samples["embedded"]["answers"] == samples["distributed"]["answers"],
        "modes": modes,
        "distributed_added_p50_ms": added,
        "kv_transfer_p50_ms": kv_transfer,
        # Each stage's own work as it reports it, and what the answer took beyond it: where the gap is.
        "stage_work_p50_ms": stage_work,
        "distributed_added_p50_ms_excluding_kv": without_kv["distributed"] - without_kv["embedded"],
        "distributed_added_per_request_p50_ms_excluding_kv": added_per_request(samples["embedded"], samples["distributed"]),
        # What three bare calls and the claim check add on this machine before any of our code.
        "design_floor": floor,
        "kv_bytes_per_request": {k: statistics.median(v) for k, v in kv_bytes.items()},
        "minor_page_faults_per_answer": faults,
        "grpc_round_trip": round_trips,
        "generator_call": generator,
        "stage_call_overhead_ms": overheads,
        "redis_kv": redis_kv,
    }
