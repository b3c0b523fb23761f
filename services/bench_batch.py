"""``dartserve bench batch``: a batch through one Celery worker against the same requests sent
one by one to ``/v1/answer``, in distributed mode, in the same run.

Both take turns over several runs; before each pass every cached image and KV cache is
deleted, so neither profits from the other's work (within a pass, requests that share an
image reuse it, as they would in use).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import httpx

from dartserve.bench import cpu_name
from services.bench import demo_requests, wait_ready
from services.processes import BenchRun

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


def run_batch_bench(requests: int = 200, runs: int = 3, model: str | None = None, threads: int | None = None) -> dict:
    import redis

    from dartserve.demo import default_model

    model = model or default_model()
    bodies = batch_requests(requests)
    rates = {"one_by_one": [], "batch": []}
    answers = {}
    with BenchRun(model, threads) as run:
        distributed = run.distributed()
        worker = run.dartserve("worker", distributed.env)
        wait_ready(distributed.url, distributed.processes["gateway"])
        client = redis.Redis.from_url(run.redis_url)
        with httpx.Client(base_url=distributed.url, timeout=300) as http:
            _one_by_one(http, bodies[:4])  # warm-up, not measured
            for run_index in range(runs):
                order = ("one_by_one", "batch") if run_index % 2 == 0 else ("batch", "one_by_one")
                for mode in order:
                    for key in client.scan_iter("dartserve:*", count=1000):
                        client.delete(key)
                    started = time.perf_counter()
                    answers[mode] = _one_by_one(http, bodies) if mode == "one_by_one" else _batch(http, bodies, worker)
                    rates[mode].append(len(bodies) / (time.perf_counter() - started))
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    return {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "threads_per_process": threads or "default",
        "model": model,
        "requests": requests,
        "distinct_images": len({b["image"] for b in bodies}),
        "runs": runs,
        "items_per_s": {mode: {"median": medians[mode], "runs": values} for mode, values in rates.items()},
        "batch_vs_one_by_one": medians["batch"] / medians["one_by_one"],
        "same_answers": answers["batch"] == answers["one_by_one"],
    }


def _one_by_one(http: httpx.Client, bodies: list[dict]) -> list[str]:
    answers = []
    for body in bodies:
        reply = http.post("/v1/answer", json={k: v for k, v in body.items() if k != "custom_id"})
        reply.raise_for_status()
        answers.append(reply.json()["answer"])
    return answers


def _batch(http: httpx.Client, bodies: list[dict], worker) -> list[str]:
    jsonl = "".join(json.dumps(body) + "\n" for body in bodies)
    created = http.post("/v1/batches", content=jsonl, headers={"Content-Type": "application/jsonl"})
    created.raise_for_status()
    while True:
        status = http.get(f"/v1/batches/{created.json()['id']}").json()
        if status["status"] != "queued" and status["status"] != "running":
            break
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}")
        time.sleep(POLL_S)
    if status["status"] != "completed" or status["request_counts"]["failed"]:
        raise RuntimeError(f"the batch did not complete cleanly: {status}")
    lines = http.get(f"/v1/batches/{status['id']}/results").text.splitlines()
    return [json.loads(line)["response"]["body"]["answer"] for line in lines]
