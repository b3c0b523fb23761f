"""Batches for real: the stages and gateway as processes over a private redis-server, and
Celery workers as processes of their own (``dartserve worker``), many items in flight each;
``dartserve serve`` with the worker it runs itself."""

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
import redis

from cluster import b64, png, pruner_down, running_cluster
from dartserve.demo import CHECKPOINT
from processes import RedisServer, dartserve_process, free_port, stop, wait_until
from services.batches.namespace import model_namespace

PRUNINGS = [{"method": "dart", "budget": 64}, {"method": "none"}, {"method": "fastv", "ratio": 0.25}]


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory):
    # A short visibility timeout, so that an item taken by a killed worker comes back within seconds.
    with running_cluster(redis_server.url, tmp_path_factory.mktemp("logs"), {"DARTSERVE_BATCH_VISIBILITY_S": "3"}) as running:
        yield running


@pytest.fixture
def worker(cluster, tmp_path):
    """Starts workers; each is stopped at the end of the test."""
    started = []

    def start(*args, env=None):
        log = tmp_path / f"worker{len(started)}.log"
        process = dartserve_process("worker", {**cluster["env"], "DARTSERVE_BATCH_VISIBILITY_S": "3", **(env or {})}, log, args)
        started.append((process, log))
        return process, log

    yield start
    stop([process for process, _ in started])


def requests_for(count: int, images: int) -> list[dict]:
    """``count`` requests over ``images`` distinct images, each image asked about several times."""
    out = []
    for i in range(count):
        data, item = png(i % images)
        question = item.question if i < images else ["how many objects are there ?", "is there a red circle ?", "what colour is the square ?"][i % 3]
        out.append({"custom_id": f"req-{i}", "image": b64(data), "question": question, "pruning": PRUNINGS[i % 3], "max_new_tokens": 6})
    return out


def one_item_batch(batches) -> str:
    """A batch of one request with its image, stored as the gateway stores it."""
    import hashlib

    data, _ = png(0)
    digest = hashlib.sha256(data).hexdigest()
    return batches.create([{"custom_id": "x", "fields": {"question": "q"}, "images": [digest]}], {digest: data}, "demo")


def submit(cluster, requests: list[dict]) -> dict:
    jsonl = "".join(json.dumps(r) + "\n" for r in requests)
    reply = httpx.post(f"{cluster['url']}/v1/batches", content=jsonl, headers={"Content-Type": "application/jsonl"}, timeout=60)
    assert reply.status_code == 202, reply.text
    return reply.json()


def wait_for(cluster, batch_id: str, process, log, timeout_s: float = 300) -> dict:
    status = {}

    def finished():
        status.update(httpx.get(f"{cluster['url']}/v1/batches/{batch_id}").json())
        return status["status"] in ("completed", "failed", "cancelled")

    wait_until(finished, "the batch", process, log, timeout_s)
    return status


def results(cluster, batch_id: str) -> list[dict]:
    reply = httpx.get(f"{cluster['url']}/v1/batches/{batch_id}/results")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/jsonl")
    return [json.loads(line) for line in reply.text.splitlines()]


def test_a_batch_answers_every_request_as_v1_answer_does(cluster, worker):
    requests = requests_for(30, images=8)
    created = submit(cluster, requests)
    assert created["status"] == "queued" and created["request_counts"] == {"total": 30, "done": 0, "failed": 0}
    process, log = worker()
    status = wait_for(cluster, created["id"], process, log)
    assert status["status"] == "completed" and status["request_counts"] == {"total": 30, "done": 30, "failed": 0}
    assert status["created_at"] <= status["started_at"] <= status["finished_at"]
    lines = results(cluster, created["id"])
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    for request, line in zip(requests, lines):
        fields = {k: v for k, v in request.items() if k != "custom_id"}
        single = httpx.post(f"{cluster['url']}/v1/answer", json=fields, timeout=60).json()
        body = line["response"]["body"]
        assert line["error"] is None and line["response"]["status_code"] == 200
        for key in ("answer", "model", "finish_reason", "pruning"):
            assert body[key] == single[key], (request["custom_id"], key)
        assert {k: v for k, v in body["usage"].items() if k != "cached_images"} == {k: v for k, v in single["usage"].items() if k != "cached_images"}
    # Each image is encoded once, by one of the requests about it, though they ran at once.
    encoded = [request["image"] for request, line in zip(requests, lines) if line["response"]["body"]["usage"]["cached_images"] == 0]
    assert sorted(encoded) == sorted({request["image"] for request in requests})
    client = redis.Redis.from_url(cluster["env"]["DARTSERVE_REDIS_URL"])
    # The gateway and the worker named the namespace alike, after the model.
    keys = list(client.scan_iter(f"{model_namespace(str(CHECKPOINT))}:batch:{{{created['id']}}}*"))
    assert len(keys) == 4 and all(0 < client.ttl(key) <= 86400 for key in keys)  # results included
    # Every log line is JSON (no banner, no raw warning), and an item's lines, in the worker and
    # in every stage, carry BATCH_ID/CUSTOM_ID.
    item_id = f"{created['id']}/{requests[-1]['custom_id']}"
    for name, path in [("worker", log), *((stage, cluster["logs"] / f"{stage}.log") for stage in ("vision", "pruner", "generator"))]:
        logged = lambda: [json.loads(line) for line in path.read_text().splitlines() if line]  # noqa: E731
        wait_until(lambda: any(line["request_id"] == item_id for line in logged()), f"the {name}'s log line", timeout_s=10)  # a stage logs a call once it has answered


def test_a_killed_worker_loses_and_duplicates_nothing(cluster, worker):
    requests = requests_for(60, images=60)
    created = submit(cluster, requests)
    first, log = worker("--concurrency", "12")
    client = redis.Redis.from_url(cluster["env"]["DARTSERVE_REDIS_URL"])
    unacked = f"{model_namespace(str(CHECKPOINT))}:unacked"

    def holding_many():  # killed while it holds many unacknowledged items, which must come back
        done = httpx.get(f"{cluster['url']}/v1/batches/{created['id']}").json()["request_counts"]["done"]
        return done >= 5 and client.hlen(unacked) >= 8

    wait_until(holding_many, "five answers and many items in hand", first, log)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done_at_kill = httpx.get(f"{cluster['url']}/v1/batches/{created['id']}").json()["request_counts"]["done"]
    assert done_at_kill < 60, "the worker finished before it was killed; the test proves nothing"
    second, log = worker("--concurrency", "12")
    status = wait_for(cluster, created["id"], second, log)
    # Each item counted once: a redelivered item whose result was stored changed nothing.
    assert status["status"] == "completed" and status["request_counts"] == {"total": 60, "done": 60, "failed": 0}
    lines = results(cluster, created["id"])
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    assert all(line["error"] is None and line["response"]["body"]["answer"] for line in lines)


def test_items_wait_out_an_unavailable_stage(cluster, worker, tmp_path):
    """A stage down is transient: items retry with backoff and complete once it is back."""
    with pruner_down(cluster, tmp_path / "pruner.log"):
        created = submit(cluster, requests_for(3, images=3))
        process, log = worker(env={"DARTSERVE_BATCH_RETRIES": "60"})
        wait_until(lambda: "Retry in" in log.read_text(), "a retry", process, log, timeout_s=60)
        assert httpx.get(f"{cluster['url']}/v1/batches/{created['id']}").json()["request_counts"]["done"] == 0
    status = wait_for(cluster, created["id"], process, log)
    assert status["request_counts"] == {"total": 3, "done": 3, "failed": 0}


def test_an_item_whose_stage_stays_down_is_recorded_as_503(cluster, worker, tmp_path):
    with pruner_down(cluster, tmp_path / "pruner.log"):
        created = submit(cluster, requests_for(1, images=1))
        process, log = worker(env={"DARTSERVE_BATCH_RETRIES": "2"})
        status = wait_for(cluster, created["id"], process, log, timeout_s=120)
    assert status["status"] == "completed" and status["request_counts"] == {"total": 1, "done": 0, "failed": 1}
    (line,) = results(cluster, created["id"])
    assert line["response"] is None and line["error"]["status_code"] == 503 and "after 2 retries" in line["error"]["message"]
    # Which address failed, and how, is in the worker's log, not in the results a client reads.
    assert str(cluster["ports"]["pruner"]) not in line["error"]["message"] and str(cluster["ports"]["pruner"]) in log.read_text()
    wait_until(lambda: httpx.get(f"{cluster['url']}/readyz").status_code == 200, "the pruner back", timeout_s=120)


def test_item_errors_are_recorded_without_failing_the_batch(cluster, worker):
    good = requests_for(2, images=2)
    not_an_image = {"custom_id": "broken", "image": b64(b"GIF89a not really"), "question": "what colour is the circle ?"}
    created = submit(cluster, [good[0], not_an_image, good[1]])
    process, log = worker()
    status = wait_for(cluster, created["id"], process, log)
    assert status["status"] == "completed" and status["request_counts"] == {"total": 3, "done": 2, "failed": 1}
    lines = results(cluster, created["id"])
    assert [line["custom_id"] for line in lines] == ["req-0", "broken", "req-1"]
    assert lines[1]["response"] is None and lines[1]["error"]["status_code"] == 400 and "image" in lines[1]["error"]["message"]


def test_invalid_batches_are_rejected_whole_with_line_numbers(cluster):
    url = f"{cluster['url']}/v1/batches"
    data, _ = png(0)
    good = json.dumps({"custom_id": "a", "image": b64(data), "question": "how many objects are there ?"})
    jsonl = "\n".join([good, "{not json", json.dumps({"custom_id": "a", "question": "again"}), json.dumps({"question": "no id"})])
    reply = httpx.post(url, content=jsonl, headers={"Content-Type": "application/jsonl"})
    assert reply.status_code == 400 and reply.json()["errors"][0]["line"] == 2
    body = "\n".join([good, json.dumps({"custom_id": "a", "question": "again"}), json.dumps({"question": "no id"}), json.dumps({"custom_id": "b", "image": b64(data), "question": "x", "pruning": {"method": "magic"}})])
    reply = httpx.post(url, content=body, headers={"Content-Type": "application/jsonl"})
    errors = reply.json()["errors"]
    assert reply.status_code == 400 and [e["line"] for e in errors] == [2, 3, 4]
    assert "used twice" in errors[0]["message"] and errors[1]["param"] == "custom_id" and errors[2]["param"] == "pruning"
    cases = [
        (json.dumps({"requests": []}), "application/json", 400),
        (json.dumps([good]), "application/json", 400),
        (json.dumps({"custom_id": "s", "image": b64(data), "question": "q", "stream": True}), "application/jsonl", 400),
        (json.dumps({"custom_id": "s", "image": "%%%", "question": "q"}), "application/jsonl", 400),
        (good, "text/csv", 415),
    ]
    for content, kind, expected in cases:
        reply = httpx.post(url, content=content, headers={"Content-Type": kind})
        assert reply.status_code == expected and set(reply.json()["error"]) == {"type", "message", "param"}, (content[:40], reply.text)
    # Accepted (and cancelled, so that no later test's worker runs them): a multipart upload, a
    # JSON batch, OpenAI-style lines, a byte-order mark, a line separator inside a string, and
    # a media type in capitals.
    openai_line = json.dumps({"custom_id": "o", "method": "POST", "url": "/v1/answer", "body": {"image": b64(data), "question": "q"}})
    separator = json.dumps({"custom_id": "u", "image": b64(data), "question": "how many\u2028objects ?"}, ensure_ascii=False)
    accepted = [
        httpx.post(url, files={"file": ("batch.jsonl", good + "\n", "application/jsonl")}),
        httpx.post(url, json={"requests": [json.loads(good)]}),
        httpx.post(url, content="\ufeff" + openai_line + "\r\n" + separator + "\n", headers={"Content-Type": "application/jsonl"}),
        httpx.post(url, content=good, headers={"Content-Type": "Application/JSONL; charset=utf-8"}),  # media types ignore case
    ]
    for created in accepted:
        assert created.status_code == 202, created.text
        assert httpx.post(f"{url}/{created.json()['id']}/cancel").json()["status"] == "cancelled"
    assert accepted[2].json()["request_counts"]["total"] == 2
    lone = json.dumps({"custom_id": "\ud800x", "image": b64(data), "question": "q"})
    assert httpx.post(url, content=lone, headers={"Content-Type": "application/jsonl"}).status_code == 400


def test_unknown_batches_and_finished_cancels_get_4xx(cluster, worker):
    for path in ("/v1/batches/batch_nope", "/v1/batches/batch_nope/results"):
        reply = httpx.get(cluster["url"] + path)
        assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found"
    assert httpx.post(f"{cluster['url']}/v1/batches/batch_nope/cancel").status_code == 404
    created = submit(cluster, requests_for(1, images=1))
    process, log = worker()
    wait_for(cluster, created["id"], process, log)
    reply = httpx.post(f"{cluster['url']}/v1/batches/{created['id']}/cancel")
    assert reply.status_code == 409 and "already completed" in reply.json()["error"]["message"]


def test_cancelling_a_queued_batch_runs_none_of_it_and_lists_every_request(cluster, worker):
    requests = requests_for(4, images=4)
    created = submit(cluster, requests)
    reply = httpx.post(f"{cluster['url']}/v1/batches/{created['id']}/cancel")
    assert reply.status_code == 200 and reply.json()["status"] == "cancelled"
    process, log = worker()
    wait_until(lambda: log.read_text().count("succeeded") == 4, "the worker skipping every item", process, log, timeout_s=60)
    status = httpx.get(f"{cluster['url']}/v1/batches/{created['id']}").json()
    assert status["status"] == "cancelled" and status["request_counts"]["done"] == 0
    lines = results(cluster, created["id"])
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    # Every error row has a status_code, a cancelled one too.
    assert all(line["error"] == {"status_code": 499, "type": "cancelled", "message": "the batch was cancelled before this request ran", "param": None} for line in lines)


def test_dartserve_serve_runs_batches_itself_once_redis_answers(tmp_path):
    """``dartserve serve`` alone, driven by ``dartserve batch``, which sends DARTSERVE_API_KEY to a
    gateway that wants a key. Started before its Redis, it answers questions, says why batches
    do not run, refuses them with a 503 that names what is missing, and runs them once Redis
    answers, with no other process started by hand."""
    redis_server = RedisServer()
    redis_server.stop()
    env = {"DARTSERVE_REDIS_URL": redis_server.url, "DARTSERVE_PORT": str(free_port()), "DARTSERVE_API_KEYS": "batch-key"}
    url = f"http://127.0.0.1:{env['DARTSERVE_PORT']}"
    log = tmp_path / "serve.log"
    serve = dartserve_process("serve", env, log)
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, "serve", serve, log)
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["ready"] is True and ready["batches"]["available"] is False and "Redis" in ready["batches"]["reason"]
        requests = requests_for(6, images=3)
        (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
        refused = httpx.post(f"{url}/v1/batches", json={"requests": requests}, headers={"Authorization": "Bearer batch-key"})
        message = refused.json()["error"]["message"]
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert "they need a Redis" in message and "DARTSERVE_BATCH_REDIS_URL" in message and "redis-server" in message

        redis_server.start()
        wait_until(lambda: httpx.get(f"{url}/readyz").json()["batches"]["available"], "the batch worker", serve, log, timeout_s=60)
        cli = [sys.executable, "-m", "services.cli", "batch"]
        keyless = subprocess.run([*cli, "status", "batch_x", "--url", url], capture_output=True, text=True, env=os.environ | {"DARTSERVE_API_KEY": ""})
        assert keyless.returncode == 2 and "HTTP 401" in keyless.stderr
        keyed = os.environ | {"DARTSERVE_API_KEY": "batch-key"}  # what the CLI sends
        submitted = subprocess.run([*cli, "submit", str(tmp_path / "in.jsonl"), "--wait", "-o", str(tmp_path / "out.jsonl"), "--url", url], capture_output=True, text=True, timeout=300, env=keyed)
        assert submitted.returncode == 0, submitted.stderr + log.read_text()
        batch_id = submitted.stdout.splitlines()[0]
        lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        for request, line in zip(requests, lines, strict=True):
            single = httpx.post(f"{url}/v1/answer", json={k: v for k, v in request.items() if k != "custom_id"}, headers={"Authorization": "Bearer batch-key"}, timeout=60).json()
            assert (line["custom_id"], line["response"]["body"]["answer"]) == (request["custom_id"], single["answer"])
        status = json.loads(subprocess.run([*cli, "status", batch_id, "--url", url], capture_output=True, text=True, check=True, env=keyed).stdout)
        assert status["status"] == "completed" and status["request_counts"]["done"] == 6
        printed = subprocess.run([*cli, "results", batch_id, "--url", url], capture_output=True, text=True, check=True, env=keyed).stdout
        assert [json.loads(line) for line in printed.splitlines()] == lines
        unknown = subprocess.run([*cli, "status", "batch_nope", "--url", url], capture_output=True, text=True, env=keyed)
        assert unknown.returncode == 2 and "HTTP 404" in unknown.stderr
        serve.terminate()  # stops its worker too, then ends as SIGTERM asks (uvicorn raises it again)
        assert serve.wait(timeout=60) == -signal.SIGTERM, log.read_text()
        assert "the batch worker stopped" in log.read_text()
    finally:
        stop([serve])
        redis_server.stop()


def test_probe_says_whether_each_service_on_this_host_is_healthy(cluster, worker):
    def probe(service, env):
        full = {k: v for k, v in os.environ.items() if not k.startswith("DARTSERVE_")} | env
        return subprocess.run([sys.executable, "-m", "services.cli", "probe", service], env=full, capture_output=True, timeout=60).returncode

    gateway_port = cluster["url"].rsplit(":", 1)[1]
    assert probe("gateway", {"DARTSERVE_PORT": gateway_port}) == 0
    assert probe("pruner", {"DARTSERVE_PORT": str(cluster["ports"]["pruner"])}) == 0
    assert probe("pruner", {"DARTSERVE_PORT": str(free_port())}) == 1
    redis_only = {"DARTSERVE_REDIS_URL": cluster["env"]["DARTSERVE_REDIS_URL"]}
    assert probe("worker", redis_only) == 1
    process, log = worker()
    wait_until(lambda: "ready." in log.read_text(), "the worker", process, log, timeout_s=60)
    assert probe("worker", redis_only) == 0


def test_an_item_that_raises_unexpectedly_is_recorded_as_500_not_dropped(redis_server):
    from types import SimpleNamespace

    from services.config import Settings
    from services.worker.tasks import Worker

    class CrashingStages:  # a failure no one planned for, such as a GPU fault
        def answer(self, question, previous=None, stream=True):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    settings = Settings(redis_url=redis_server.url.replace("/0", "/2"), batch_visibility_s=3)
    worker = Worker(settings, CrashingStages(), "demo", "tests")
    batch_id = one_item_batch(worker.batches)
    worker.run(SimpleNamespace(request=SimpleNamespace(retries=0)), batch_id, 0)
    (line,) = worker.batches.results(batch_id)
    # What failed inside is for the worker's log, where the trace is; the row says where to look.
    assert line["error"]["status_code"] == 500 and "illegal memory access" not in line["error"]["message"] and "log" in line["error"]["message"]
    assert worker.batches.status(batch_id)["status"] == "completed"
    # Backoff doubles, but stays under the visibility timeout, past which an item held back comes again.
    assert [worker.backoff_s(n) for n in range(4)] == [1, 1, 1, 1]
    assert [Worker(Settings(redis_url=settings.redis_url), None, "demo", "tests").backoff_s(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_batch_that_failed_to_queue_runs_none_of_its_items(redis_server):
    from types import SimpleNamespace

    from services.config import Settings
    from services.worker.tasks import Worker

    class NoStages:  # an item of a failed batch must never reach them
        def answer(self, question, previous=None, stream=True):
            raise AssertionError("an item of a failed batch was run")

    worker = Worker(Settings(redis_url=redis_server.url.replace("/0", "/2")), NoStages(), "demo", "tests")
    batch_id = one_item_batch(worker.batches)
    worker.batches.fail(batch_id, "the queue went away after the first item")
    worker.run(SimpleNamespace(request=SimpleNamespace(retries=0)), batch_id, 0)
    assert worker.batches.results(batch_id) == [] and worker.batches.status(batch_id)["status"] == "failed"
    worker.batches.fail("batch_expired", "the queue went away")  # a batch gone meanwhile stays gone
    assert worker.batches.client.keys("*batch_expired*") == []


def test_an_item_whose_error_cannot_be_recorded_goes_back_on_the_queue(redis_server):
    from types import SimpleNamespace

    from celery.exceptions import Reject

    from dartserve.kv.store import StoreUnavailable
    from services.config import Settings
    from services.worker.tasks import Worker

    class DownStages:
        def answer(self, question, previous=None, stream=True):
            raise StoreUnavailable("Redis is unreachable")

    worker = Worker(Settings(redis_url=redis_server.url.replace("/0", "/2"), batch_retries=1), DownStages(), "demo", "tests")
    batch_id = one_item_batch(worker.batches)

    class QueueDown:  # Celery's retry when it cannot publish: it would drop the message
        request = SimpleNamespace(retries=0)

        def retry(self, exc, countdown, kwargs):
            raise Reject(exc, requeue=False)

    with pytest.raises(Reject) as refused:
        worker.run(QueueDown(), batch_id, 0)
    assert refused.value.requeue is True

    def unreachable(*args):
        raise StoreUnavailable("Redis is unreachable")

    worker.batches.record = unreachable  # the retries are spent and the error cannot be written
    with pytest.raises(Reject) as refused:
        worker.run(SimpleNamespace(request=SimpleNamespace(retries=1)), batch_id, 0, unavailable=1)
    assert refused.value.requeue is True


def test_a_batch_whose_requests_were_evicted_fails_instead_of_hanging(redis_server):
    from types import SimpleNamespace

    from services.config import Settings
    from services.worker.tasks import Worker

    worker = Worker(Settings(redis_url=redis_server.url.replace("/0", "/2")), None, "demo", "tests")
    batch_id = one_item_batch(worker.batches)
    worker.batches.client.delete(worker.batches._keys(batch_id)["items"])  # evicted under memory pressure
    worker.run(SimpleNamespace(request=SimpleNamespace(retries=0)), batch_id, 0)
    status = worker.batches.status(batch_id)
    assert status["status"] == "failed" and "evicted" in status["error"]


def test_a_busy_stage_makes_an_item_wait_without_spending_its_retries(redis_server):
    from services.config import Settings
    from services.frontend.errors import Overloaded, Unavailable
    from services.worker.tasks import Worker

    class Stages:
        error = Overloaded("a stage is at its limit of concurrent calls")

        def answer(self, question, previous=None, stream=True):
            raise self.error

    class Retried(Exception):
        pass

    class Task:
        def __init__(self):
            self.request, self.kwargs = type("R", (), {"retries": 9})(), None

        def retry(self, exc, countdown, kwargs):
            self.kwargs = kwargs
            return Retried()

    stages = Stages()
    worker = Worker(Settings(redis_url=redis_server.url.replace("/0", "/2"), batch_retries=2), stages, "demo", "tests")
    batch_id = one_item_batch(worker.batches)
    task = Task()
    with pytest.raises(Retried):  # busy: it waits, with its budget for outages untouched
        worker.run(task, batch_id, 0, unavailable=2)
    assert task.kwargs == {"unavailable": 2}
    stages.error = Unavailable("UNAVAILABLE: the pruner is down")
    with pytest.raises(Retried):
        worker.run(task, batch_id, 0, unavailable=1)
    assert task.kwargs == {"unavailable": 2}
    worker.run(task, batch_id, 0, unavailable=2)  # down, and the budget is spent: a 503 is recorded
    (line,) = worker.batches.results(batch_id)
    assert line["error"]["status_code"] == 503


def test_an_item_recorded_twice_is_counted_and_listed_once(redis_server):
    """A redelivered item (its worker died after storing its result) changes nothing."""
    from services.batches.store import BatchStore

    store = BatchStore.from_url(redis_server.url.replace("/0", "/2"), ttl_s=600, namespace="tests")
    items = [{"custom_id": name, "fields": {"question": "q"}, "images": []} for name in ("a", "b")]
    batch_id = store.create(items, {}, "demo")
    first = {"custom_id": "a", "response": {"status_code": 200, "body": {"answer": "red"}}, "error": None}
    assert store.record(batch_id, "a", first) is True
    assert store.record(batch_id, "a", first | {"response": None, "error": {"type": "server_error"}}) is False
    status = store.status(batch_id)
    assert (status["status"], status["request_counts"]) == ("queued", {"total": 2, "done": 1, "failed": 0})
    assert store.record(batch_id, "b", first | {"custom_id": "b"}) is True
    assert store.status(batch_id)["status"] == "completed"
    assert store.results(batch_id) == [first, first | {"custom_id": "b"}]
