"""Starting dartserve's processes: each stage as a gRPC service, the gateway, or all in one."""

from __future__ import annotations

import torch

from dartserve.demo import default_model
from dartserve.engine import Engine
from dartserve.kv.store import MemoryStore, RedisStore
from dartserve.stages import DecodeStep, PrefillStep, VisionStep

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_name(settings) -> str:
    return settings.model or "dartserve-demo"


def load_engine(settings) -> Engine:
    if settings.dtype is not None and settings.dtype not in DTYPES:
        raise ValueError(f"DARTSERVE_DTYPE must be one of {sorted(DTYPES)}, got {settings.dtype!r}")
    return Engine.load(settings.model or default_model(), device=settings.device, dtype=DTYPES.get(settings.dtype))


def start_stage(name: str, settings, engine: Engine | None = None, store=None, port: int | None = None):
    """Starts the ``vision``, ``pruner`` or ``generator`` gRPC service; returns the running server."""
    from services.generator.server import serve as serve_generator
    from services.pruner.server import serve as serve_pruner
    from services.vision.server import serve as serve_vision

    engine = engine or load_engine(settings)
    store = store or RedisStore.from_url(settings.redis_url)
    port = settings.port_for(name) if port is None else port
    if name == "vision":
        return serve_vision(VisionStep(engine, store, settings.ttl_s, settings.max_image_pixels), settings, port)
    if name == "pruner":
        return serve_pruner(PrefillStep(engine, store, settings.ttl_s), settings, port)
    if name == "generator":
        return serve_generator(DecodeStep(engine, store, settings.ttl_s), settings, port)
    raise ValueError(f"unknown stage {name!r}")


def embedded_gateway(settings, engine: Engine | None = None):
    """The gateway with every stage in this process and an in-memory store (``dartserve serve``)."""
    from services.gateway.backends import LocalBackend

    engine = engine or load_engine(settings)
    store = MemoryStore(settings.memory_store_mb << 20)
    backend = LocalBackend(
        VisionStep(engine, store, settings.ttl_s, settings.max_image_pixels),
        PrefillStep(engine, store, settings.ttl_s),
        DecodeStep(engine, store, settings.ttl_s),
    )
    return _gateway(backend, store, settings)


def distributed_gateway(settings):
    """The gateway in front of the gRPC stages, keeping conversations in Redis."""
    from services.gateway.backends import GrpcBackend

    return _gateway(GrpcBackend(settings), RedisStore.from_url(settings.redis_url), settings)


def _gateway(backend, store, settings):
    """In both modes batches go through Redis (the Celery broker and the batch store), which a
    batch needs only when one is sent."""
    from services.gateway.app import Gateway
    from services.gateway.answers import Policy
    from services.gateway.batch_api import Batches
    from services.gateway.conversations import Conversations
    from services.worker.app import make_celery
    from services.worker.batches import BatchStore

    batches = Batches(
        BatchStore.from_url(settings.redis_url, settings.batch_ttl_s), make_celery(settings), model_name(settings), Policy.from_settings(settings), settings.batch_max_requests
    )
    # A turn makes at most ten stage calls, each within the timeout: two encodes and two
    # prefills, all of them again when the KV cache goes before decoding, and two decodes. A
    # hold left by a gateway that died lapses with the conversation at the latest.
    conversations = Conversations(store, settings.ttl_s, turn_s=min(10 * int(settings.rpc_timeout_s) + 10, settings.ttl_s))
    return Gateway(backend, conversations, model_name(settings), settings, batches)


def serve_http(gateway, settings) -> None:
    import uvicorn

    from services.gateway.app import create_app

    # Logging as configured (JSON, one line per request from the gateway itself).
    uvicorn.run(create_app(gateway), host=settings.host, port=settings.port_for("gateway"), log_config=None, access_log=False)


def run_worker(settings, local: bool, concurrency: int) -> None:
    """A Celery worker for batch items: stages over gRPC, or in this process with ``local``."""
    from services.gateway.backends import GrpcBackend, LocalBackend
    from services.worker.tasks import Worker, worker_app

    if local:
        engine = load_engine(settings)
        store = RedisStore.from_url(settings.redis_url)
        backend = LocalBackend(
            VisionStep(engine, store, settings.ttl_s, settings.max_image_pixels),
            PrefillStep(engine, store, settings.ttl_s),
            DecodeStep(engine, store, settings.ttl_s),
        )
    else:
        backend = GrpcBackend(settings)
    app = worker_app(settings, Worker(settings, backend, model_name(settings)))
    # One process: the stages' model (or channels) is loaded once; threads share it.
    pool = ["--pool=solo"] if concurrency == 1 else ["--pool=threads", f"--concurrency={concurrency}"]
    app.worker_main(["--quiet", "worker", "--loglevel=INFO", "--without-gossip", "--without-mingle", *pool])  # no banner: every line is JSON
