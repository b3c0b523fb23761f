"""Starting dartserve's processes: each stage as a gRPC service, the gateway, or all in one.

A process loads the parts of the model it runs: the vision service the vision tower and the
projector, the pruner and the generator the language model, ``dartserve serve`` both.
"""

from __future__ import annotations

import torch

from dartserve.demo import default_model
from dartserve.engine import Engine
from dartserve.engine.core import CoreConfig
from dartserve.kv.store import MemoryStore, RedisStore, redis_client
from dartserve.models.base import PARTS
from dartserve.stages import DecodeStep, PrefillStep, VisionStep

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STAGE_PARTS = {"vision": ("vision",), "pruner": ("language",), "generator": ("language",)}


def model_name(settings) -> str:
    return settings.model or "dartserve-demo"


def load_engine(settings, parts: tuple[str, ...] = PARTS) -> Engine:
    if settings.dtype is not None and settings.dtype not in DTYPES:
        raise ValueError(f"DARTSERVE_DTYPE must be one of {sorted(DTYPES)}, got {settings.dtype!r}")
    core = CoreConfig(settings.kv_cache_mb, max_num_batched_tokens=settings.max_num_batched_tokens, max_num_seqs=settings.max_num_seqs)
    return Engine.load(settings.model or default_model(), device=settings.device, dtype=DTYPES.get(settings.dtype), core_config=core, parts=parts)


def engine_metrics(engine: Engine, registry, settings) -> None:
    """The core's metrics (``services.engine_metrics``) in ``registry``, when ``engine`` runs one."""
    from services.engine_metrics import EngineMetrics

    loop = engine.loop
    if loop.core is not None:
        loop.on_output = EngineMetrics(loop.core, registry, model_name(settings)).observe_output


def start_stage(name: str, settings, engine: Engine | None = None, store=None, port: int | None = None):
    """Starts the ``vision``, ``pruner`` or ``generator`` gRPC service; returns the running server."""
    from services.generator.server import serve as serve_generator
    from services.pruner.server import serve as serve_pruner
    from services.vision.server import serve as serve_vision

    if name not in STAGE_PARTS:
        raise ValueError(f"unknown stage {name!r}")
    engine = engine or load_engine(settings, STAGE_PARTS[name])
    store = store or RedisStore.from_url(settings.redis_url)
    port = settings.port_for(name) if port is None else port
    if name == "vision":
        return serve_vision(VisionStep(engine, store, settings.ttl_s, settings.max_image_pixels), settings, port)
    serve = serve_pruner if name == "pruner" else serve_generator
    step = (PrefillStep if name == "pruner" else DecodeStep)(engine, store, settings.ttl_s)
    server = serve(step, settings, port)
    engine_metrics(engine, server.metrics.registry, settings)
    return server


def embedded_gateway(settings, engine: Engine | None = None):
    """The gateway with the engine in this process (``dartserve serve``): images, prompts and KV
    caches stay tensors; conversation records are kept in memory."""
    from services.frontend.engine_backend import EngineBackend
    from services.frontend.prompt_limits import PromptLimits
    from services.gateway.turns import LocalLeases

    engine = engine or load_engine(settings)
    backend = EngineBackend(engine, settings.max_image_pixels, settings.memory_store_mb << 20)
    store = MemoryStore(settings.memory_store_mb << 20)
    limits = PromptLimits.of_adapter(engine.adapter)
    gateway = _gateway(backend, store, LocalLeases(), limits, settings)
    engine_metrics(engine, gateway.metrics.registry, settings)
    if settings.batch_concurrency != 0:
        gateway.batches.worker = embedded_worker(settings, backend, limits, gateway.batches.store)
    return gateway


def embedded_worker(settings, backend, limits, store):
    """The batch worker of ``dartserve serve``, on the gateway's own backend: its items are
    requests to the same engine core, as many at once as DARTSERVE_BATCH_CONCURRENCY, and never
    more than the core runs at once. ``serve_http`` starts and stops it."""
    from services.batches.namespace import batch_namespace
    from services.worker.embedded import EmbeddedWorker
    from services.worker.tasks import Worker

    worker = Worker(settings, backend, model_name(settings), batch_namespace(settings), limits)
    return EmbeddedWorker(settings, worker, min(settings.batch_in_flight, settings.max_num_seqs), store.reachable)


def distributed_gateway(settings):
    """The gateway in front of the gRPC stages, keeping conversations in Redis; it loads the
    model's processor and configuration (to refuse prompts that cannot fit), not its weights."""
    from services.frontend.backends import GrpcBackend
    from services.frontend.prompt_limits import PromptLimits
    from services.gateway.turns import RedisLeases

    leases = RedisLeases(redis_client(settings.batch_redis, socket_timeout=5.0, socket_connect_timeout=5.0))
    limits = PromptLimits.for_model(settings.model or default_model())
    return _gateway(GrpcBackend(settings), RedisStore.from_url(settings.redis_url), leases, limits, settings)


def _gateway(backend, store, leases, limits, settings):
    """In both modes batches go through Redis (the Celery broker and the batch store), which a
    batch needs only when one is sent."""
    from services.gateway.app import Gateway
    from services.frontend.answers import Policy
    from services.gateway.batch_api import Batches
    from services.gateway.conversations import Conversations
    from services.gateway.turns import TurnHolds
    from services.batches.namespace import batch_namespace
    from services.batches.queue import make_celery
    from services.batches.store import BatchStore

    policy = Policy.from_settings(settings, limits)
    namespace = batch_namespace(settings)
    batch_store = BatchStore.from_url(settings.batch_redis, settings.batch_ttl_s, namespace)
    batches = Batches(batch_store, make_celery(settings, namespace), model_name(settings), policy, settings.batch_max_requests)
    return Gateway(backend, Conversations(store, settings.ttl_s, TurnHolds(leases)), model_name(settings), settings, policy, batches)


def serve_http(gateway, settings) -> None:
    """Serves until SIGINT or SIGTERM, with the batch worker of ``dartserve serve`` beside it;
    answers in progress finish first, then the worker's items."""
    import uvicorn

    from services.gateway.app import create_app

    from services.gateway.protocol import JsonErrorsH11Protocol

    worker = gateway.batches.worker if gateway.batches is not None else None
    # Logging as configured (JSON, one line per request from the gateway itself).
    uvicorn.run(
        create_app(gateway, worker), host=settings.host, port=settings.port_for("gateway"), log_config=None, access_log=False, http=JsonErrorsH11Protocol
    )


def run_worker(settings, local: bool, concurrency: int | None = None) -> None:
    """A Celery worker for batch items: stages over gRPC, or in this process with ``local``;
    ``concurrency`` items at once (default DARTSERVE_BATCH_CONCURRENCY), each on a thread."""
    from services.batches.namespace import batch_namespace
    from services.frontend.backends import GrpcBackend
    from services.frontend.engine_backend import EngineBackend
    from services.frontend.prompt_limits import PromptLimits
    from services.worker.tasks import Worker, worker_app

    concurrency = concurrency or settings.batch_in_flight
    if concurrency < 1:
        raise ValueError("a worker answers at least one item at a time: set DARTSERVE_BATCH_CONCURRENCY or --concurrency to 1 or more")
    if local:
        engine = load_engine(settings)
        backend = EngineBackend(engine, settings.max_image_pixels, settings.memory_store_mb << 20)
        limits = PromptLimits.of_adapter(engine.adapter)
    else:
        backend = GrpcBackend(settings)
        limits = PromptLimits.for_model(settings.model or default_model())
    app = worker_app(settings, Worker(settings, backend, model_name(settings), batch_namespace(settings), limits))
    # One process: the stages' model (or channels) is loaded once; threads share it.
    pool = ["--pool=solo"] if concurrency == 1 else ["--pool=threads", f"--concurrency={concurrency}"]
    app.worker_main(["--quiet", "worker", "--loglevel=INFO", "--without-gossip", "--without-mingle", *pool])  # no banner: every line is JSON
