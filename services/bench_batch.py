"""``dartserve bench batch``: a batch on one worker against the same requests sent one by one to
``/v1/answer``, in the same run, with the same answers.

Embedded (the default), the batch runs on ``dartserve serve``'s own worker, which shares the
engine core with ``/v1/answer``; with ``distributed``, on one ``dartserve worker`` process in
front of the three gRPC stages. Both ways take turns over several runs, and no pass profits
from another's work: each sends its requests under an API key of its own (a tenant: image
tokens are cached per tenant), and every cached image and KV cache in Redis is deleted before
it; within a pass, requests that share an image reuse it, as they would in use. Workloads:

- ``decode``: the LLaVA-shaped random model of ``bench serve`` (``bench_serve.workload``), a
  new demo image each, DART keeping 64 of 576 at K=2, 64 new tokens with EOS ignored;
- ``demo``: the bundled model, four questions about each demo image, the server's default
  pruning, up to 8 new tokens;
- ``describe``: the bundled model asked to describe a test picture each, the server's default
  pruning, up to 48 new tokens; the row also gives the share of descriptions that list the
  objects right.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import time
from collections.abc import Callable

import httpx

from dartserve.bench import cpu_name
from services.bench import demo_requests, wait_ready
from services.bench_serve import workload
from services.processes import BenchRun, free_port

WORKLOADS = ("decode", "demo", "describe")
DEFAULT_REQUESTS = {"decode": 48, "demo": 200, "describe": 48}
QUESTIONS = ("how many objects are there ?", "is there a red circle ?", "what colour is the square ?")
POLL_S = 0.05


def batch_requests(count: int, per_image: int = 4) -> list[dict]:
    """``count`` requests, ``per_image`` about each image: its own question, then fixed ones."""
    images = demo_requests((count + per_image - 1) // per_image)
    out = []
    for index in range(count):
        base = images[index // per_image]
        turn = index % per_image
        question = base["question"] if turn == 0 else QUESTIONS[(turn - 1) % len(QUESTIONS)]
        out.append({**base, "question": question, "custom_id": f"item-{index}"})
    return out


def bench_requests(name: str, count: int, width: int = 1024, depth: int = 8) -> tuple[str, list[dict], Callable | None]:
    """The workload's model, its ``/v1/answer`` requests, each with a ``custom_id``, and what
    scores their answers (None: the workload is not scored)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    if name == "demo":
        from dartserve.demo import CHECKPOINT

        return str(CHECKPOINT), batch_requests(count), None
    load = workload(name, count, width, depth)
    bodies = [
        {"custom_id": f"item-{i}", "image": base64.b64encode(image).decode(), "question": question,
         "pruning": load.pruning, "max_new_tokens": load.max_tokens, "ignore_eos": load.ignore_eos}
        for i, (image, question) in enumerate(load.items)
    ]
    return load.model, bodies, load.score


def run_batch_bench(
    workloads: tuple[str, ...] = ("decode",), requests: int | None = None, runs: int = 3, distributed: bool = False,
    threads: int | None = None, width: int = 1024, depth: int = 8,
) -> list[dict]:
    return [_bench(name, requests or DEFAULT_REQUESTS[name], runs, distributed, threads, width, depth) for name in workloads]


def _bench(name: str, requests: int, runs: int, distributed: bool, threads: int | None, width: int, depth: int) -> dict:
    import redis

    model, bodies, score = bench_requests(name, requests, width, depth)
    keys = [f"bench-pass-{i}" for i in range(2 * runs + 1)]
    rates = {"one_by_one": [], "batch": []}
    answers = {}
    with BenchRun(model, threads, env={"DARTSERVE_API_KEYS": ",".join(keys)}) as run:
        if distributed:
            cluster = run.distributed()
            url, watched = cluster.url, run.dartserve("worker", cluster.env)
            wait_ready(url, cluster.processes["gateway"])
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            watched = run.dartserve("serve", {"DARTSERVE_PORT": str(port)})
            wait_ready(url, watched)
        client = redis.Redis.from_url(run.redis_url)
        fresh = iter(keys)
        with httpx.Client(base_url=url, timeout=600) as http:
            http.headers["Authorization"] = f"Bearer {next(fresh)}"
            _one_by_one(http, bodies[:2])  # warm-up, not measured
            for run_index in range(runs):
                order = ("one_by_one", "batch") if run_index % 2 == 0 else ("batch", "one_by_one")
                for mode in order:
                    http.headers["Authorization"] = f"Bearer {next(fresh)}"
                    for key in client.scan_iter("dartserve:*", count=1000):  # cached images and KV caches, not batches
                        client.delete(key)
                    started = time.perf_counter()
                    answers[mode] = _one_by_one(http, bodies) if mode == "one_by_one" else _batch(http, bodies, watched)
                    rates[mode].append(len(bodies) / (time.perf_counter() - started))
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    scored = {"answers_right": round(score(answers["batch"]), 4)} if score is not None else {}
    return {
        "workload": name,
        "mode": "distributed" if distributed else "embedded",
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "threads_per_process": threads or "default",
        "model": model,
        "requests": len(bodies),
        "distinct_images": len({b["image"] for b in bodies}),
        "max_new_tokens": bodies[0]["max_new_tokens"],
        "runs": runs,
        "items_per_s": {mode: {"median": medians[mode], "runs": values} for mode, values in rates.items()},
        "batch_vs_one_by_one": medians["batch"] / medians["one_by_one"],
        "same_answers": answers["batch"] == answers["one_by_one"],
        **scored,
    }


def _one_by_one(http: httpx.Client, bodies: list[dict]) -> list[str]:
    answers = []
    for body in bodies:
        reply = http.post("/v1/answer", json={k: v for k, v in body.items() if k != "custom_id"})
        reply.raise_for_status()
        answers.append(reply.json()["answer"])
    return answers


def _batch(http: httpx.Client, bodies: list[dict], watched) -> list[str]:
    """``watched``: the process that runs the batch, which must not exit meanwhile."""
    jsonl = "".join(json.dumps(body) + "\n" for body in bodies)
    created = http.post("/v1/batches", content=jsonl, headers={"Content-Type": "application/jsonl"})
    created.raise_for_status()
    while True:
        status = http.get(f"/v1/batches/{created.json()['id']}").json()
        if status["status"] not in ("queued", "running"):
            break
        if watched.poll() is not None:
            raise RuntimeError(f"the process running the batch exited with {watched.returncode}")
        time.sleep(POLL_S)
    if status["status"] != "completed" or status["request_counts"]["failed"]:
        raise RuntimeError(f"the batch did not complete cleanly: {status}")
    lines = http.get(f"/v1/batches/{status['id']}/results").text.splitlines()
    return [json.loads(line)["response"]["body"]["answer"] for line in lines]
