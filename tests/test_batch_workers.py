"""The batch worker that ``dartserve serve`` runs in its process, and namespaces: in process, on a
private redis-server, with a stand-in for the model (what the worker does with an item does not
depend on it)."""

import threading
import time

import pytest
import redis

from cluster import png
from processes import wait_until
from services.batches.namespace import model_namespace, queue_key
from services.batches.queue import make_celery, queue_items
from services.batches.store import BatchStore, UnknownBatch
from services.config import Settings
from services.frontend.pipeline import Final
from services.worker.embedded import EmbeddedWorker
from services.worker.tasks import Worker


class Answers:
    """Answers every question with the same text, counting them; ``hold`` keeps each waiting."""

    def __init__(self) -> None:
        self.questions, self.hold = [], threading.Event()
        self.hold.set()

    def answer(self, question, previous=None, stream=True):
        self.questions.append(question)
        self.hold.wait()
        yield Final("red", [1], "stop", {}, {"completion_tokens": 1}, {}, {"method": "none"})


def batch(store: BatchStore, count: int, tenant: str = "") -> str:
    """A batch stored as the gateway stores it: ``count`` questions about one image."""
    import hashlib

    data, _ = png(0)
    digest = hashlib.sha256(data).hexdigest()
    items = [{"custom_id": f"q{i}", "fields": {"question": "what colour is the circle ?"}, "images": [digest], "tenant": tenant} for i in range(count)]
    return store.create(items, {digest: data}, "demo", tenant)


@pytest.fixture
def workers(redis_server):
    """Starts embedded workers on the test's Redis, by namespace; each is stopped at the end."""
    settings = Settings(redis_url=redis_server.url.replace("/0", "/3"), batch_visibility_s=3)
    started = []

    def start(namespace: str, concurrency: int = 4) -> tuple[EmbeddedWorker, Answers, BatchStore]:
        answers = Answers()
        worker = Worker(settings, answers, "demo", namespace)
        embedded = EmbeddedWorker(settings, worker, concurrency, worker.batches.reachable)
        embedded.start()
        started.append(embedded)
        wait_until(lambda: embedded.unavailable is None, f"the worker of {namespace}", timeout_s=30)
        return embedded, answers, worker.batches

    start.settings = settings
    yield start
    for embedded in started:
        embedded.stop(timeout_s=10)
    redis.Redis.from_url(settings.redis_url).flushdb()


def done(store: BatchStore, batch_id: str) -> bool:
    return store.status(batch_id)["status"] == "completed"


def test_two_namespaces_on_one_redis_never_see_each_others_batches(workers):
    settings = workers.settings
    alpha = BatchStore.from_url(settings.batch_redis, settings.batch_ttl_s, "alpha")
    beta_worker, beta_answers, beta = workers("beta")
    batch_id = batch(alpha, 5)
    queue_items(make_celery(settings, "alpha"), batch_id, 5)
    client = redis.Redis.from_url(settings.batch_redis)
    time.sleep(2)  # beta's worker, listening all along, takes none of alpha's items
    assert beta_answers.questions == [] and client.llen(queue_key("alpha")) == 5
    with pytest.raises(UnknownBatch):
        beta.status(batch_id)
    assert beta.issued(batch_id, "") is None and alpha.issued(batch_id, "") is not None  # to beta: never made, not lost
    beta_worker.stop(timeout_s=10)  # Celery's event loop is one per process: one worker at a time
    _, alpha_answers, _ = workers("alpha")
    wait_until(lambda: done(alpha, batch_id), "alpha's batch", timeout_s=30)
    assert len(alpha_answers.questions) == 5
    assert [line["response"]["body"]["answer"] for line in alpha.results(batch_id)] == ["red"] * 5
    # Everything the queue and the store wrote is under one namespace or the other.
    assert {key.split(b":", 1)[0] for key in client.keys("*")} <= {b"alpha", b"beta"}


def test_items_run_at_once_and_share_one_encode_of_their_image(workers):
    embedded, answers, store = workers("many", concurrency=6)
    answers.hold.clear()
    batch_id = batch(store, 12, tenant="t")
    queue_items(make_celery(workers.settings, "many"), batch_id, 12)
    # The first item about the image encodes it while the others wait; once its answer has
    # begun, the rest go on together, up to the worker's concurrency.
    wait_until(lambda: len(answers.questions) == 1, "the first item", timeout_s=30)
    time.sleep(0.5)
    assert len(answers.questions) == 1
    answers.hold.set()
    wait_until(lambda: done(store, batch_id), "the batch", timeout_s=30)
    assert len(answers.questions) == 12


def test_a_worker_that_stops_by_itself_is_started_again(workers):
    embedded, answers, store = workers("again")
    def fail():
        raise RuntimeError("an error Celery cannot recover from")

    embedded._hub.call_soon(fail)  # in its event loop, where Celery stops on such an error
    wait_until(lambda: embedded.unavailable is not None, "the worker seen stopped", timeout_s=10)
    wait_until(lambda: embedded.unavailable is None, "the worker started again", timeout_s=30)
    batch_id = batch(store, 3)
    queue_items(make_celery(workers.settings, "again"), batch_id, 3)
    wait_until(lambda: done(store, batch_id), "the batch", timeout_s=30)


def test_the_default_namespace_is_named_after_the_model_s_configuration(checkpoints, tmp_path):
    import shutil

    llava = model_namespace(str(checkpoints["llava"]))
    assert llava.startswith("dartserve-") and llava != model_namespace(str(checkpoints["qwen2_vl"]))
    copy = shutil.copytree(checkpoints["llava"], tmp_path / "elsewhere")
    assert model_namespace(str(copy)) == llava  # wherever the checkpoint lies
    with pytest.raises(ValueError):
        Settings.from_env({"DARTSERVE_BATCH_NAMESPACE": "a:b"})


def test_bench_batch_reports_the_batch_against_one_by_one_with_the_same_answers():
    from services.bench_batch import run_batch_bench

    (row,) = run_batch_bench(("demo",), requests=6, runs=1)
    assert (row["workload"], row["mode"], row["requests"], row["distinct_images"]) == ("demo", "embedded", 6, 2)
    assert row["same_answers"] is True
    rates = row["items_per_s"]
    assert rates["batch"]["median"] > 0 and rates["one_by_one"]["median"] > 0
    assert row["batch_vs_one_by_one"] == rates["batch"]["median"] / rates["one_by_one"]["median"]
