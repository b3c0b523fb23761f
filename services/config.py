"""Service settings, read from environment variables; docs/configuration.md lists them (``make docs``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from dartserve.checks import MAX_PIXELS
from dartserve.defaults import DEFAULT_PRUNING, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS
from dartserve.kv.store import DEFAULT_TTL_S
from services.batches.namespace import check_name

ENVIRONMENT = {
    "DARTSERVE_MODEL": "checkpoint directory or Hugging Face id (default: the bundled demo model)",
    "DARTSERVE_DEVICE": "cpu, cuda, cuda:1, ... (default cpu)",
    "DARTSERVE_DTYPE": "float32, float16 or bfloat16 (default: the checkpoint's)",
    "DARTSERVE_REDIS_URL": "Redis for image tokens, claim checks, KV caches and conversations: a cache, which may evict (default redis://127.0.0.1:6379/0)",
    "DARTSERVE_BATCH_REDIS_URL": "Redis for the batch queue, batch records and conversations' turn holds, which must persist (AOF) and never evict (noeviction); see docs/deploy.md (default: DARTSERVE_REDIS_URL)",
    "DARTSERVE_HOST": "interface a server binds to (default 127.0.0.1)",
    "DARTSERVE_PORT": "port a server listens on (defaults: gateway 8000, vision 50051, pruner 50052, generator 50053)",
    "DARTSERVE_METRICS_PORT": "a gRPC stage's Prometheus /metrics port (defaults: vision 9101, pruner 9102, generator 9103; 0 turns them off)",
    "DARTSERVE_VISION_ADDR": "the gateway's vision service (default 127.0.0.1:50051)",
    "DARTSERVE_PRUNER_ADDR": "the gateway's pruner service (default 127.0.0.1:50052)",
    "DARTSERVE_GENERATOR_ADDR": "the gateway's generator service (default 127.0.0.1:50053)",
    "DARTSERVE_PRUNING": f"default pruning as JSON (default {json.dumps(DEFAULT_PRUNING)})",
    "DARTSERVE_TTL_S": f"lifetime of cached prompts, KV caches and conversations (default {DEFAULT_TTL_S})",
    "DARTSERVE_MEMORY_STORE_MB": "embedded mode's in-memory cache of images and their tokens, and its store of conversation records, in MB each; when full, what was used least recently (images) or expires first (records) goes (default 4096)",
    "DARTSERVE_KV_CACHE_MB": "the engine core's KV pool, in MB, preallocated (default: 80% of the CUDA memory free once the weights are loaded; 2048 on the CPU)",
    "DARTSERVE_MAX_NUM_BATCHED_TOKENS": f"tokens the engine core runs in one step at most: prompts longer than what is left run in chunks (default {MAX_NUM_BATCHED_TOKENS})",
    "DARTSERVE_MAX_NUM_SEQS": f"requests the engine core runs at once at most; more wait (default {MAX_NUM_SEQS})",
    "DARTSERVE_RPC_TIMEOUT_S": "the gateway's deadline for each gRPC call (default 60)",
    "DARTSERVE_MAX_MESSAGE_MB": "largest gRPC message and request body (default 32)",
    "DARTSERVE_IMAGE_URL_HOSTS": "comma-separated hosts (or *.domain) whose http(s) image URLs the gateway fetches (default: none, URLs are refused)",
    "DARTSERVE_MAX_IMAGES": "most images in one request (default 8)",
    "DARTSERVE_MAX_IMAGE_PIXELS": "largest image, in pixels, decoded (default 16777216)",
    "DARTSERVE_WORKERS": "threads serving a gRPC stage's calls: the calls it works on at once (default 8)",
    "DARTSERVE_DRAIN_S": "on SIGTERM, seconds a gRPC stage reports NOT_SERVING before it refuses new calls (default 2)",
    "DARTSERVE_CONNECTION_AGE_S": "seconds a gRPC stage keeps a client's connection before asking it to reconnect, so that replicas added since get their share (default 120)",
    "DARTSERVE_MAX_QUEUE": "calls a gRPC stage keeps waiting beyond those; more get RESOURCE_EXHAUSTED, which the gateway answers with 429 (default 32)",
    "DARTSERVE_MAX_REQUESTS": "requests the gateway answers at once; more get 429 with Retry-After (default 64)",
    "DARTSERVE_MAX_UPLOADS": "request bodies the gateway receives at once, apart from those it answers; more get 429 with Retry-After (default 256)",
    "DARTSERVE_BODY_TIMEOUT_S": "seconds a request body may take to arrive once its headers have; a slower one gets 408 (default 30)",
    "DARTSERVE_STAGE_TOKEN_FILE": "a file holding the token (16 or more printable ASCII characters; a mounted secret) that the gRPC stages require of their callers and the gateway and workers send; a stage with neither it nor DARTSERVE_TLS_CLIENT_CA listens on 127.0.0.1 only",
    "DARTSERVE_TLS_CERT": "a gRPC stage's certificate (PEM); with DARTSERVE_TLS_KEY, the stage serves TLS only",
    "DARTSERVE_TLS_KEY": "the private key (PEM) of DARTSERVE_TLS_CERT",
    "DARTSERVE_TLS_CLIENT_CA": "a gRPC stage accepts only clients with a certificate from this CA (mutual TLS)",
    "DARTSERVE_TLS_CA": "the CA (PEM) the gateway and workers trust for the stages' certificates; set, they call the stages over TLS",
    "DARTSERVE_TLS_CLIENT_CERT": "the gateway's and workers' certificate (PEM) for mutual TLS",
    "DARTSERVE_TLS_CLIENT_KEY": "the private key (PEM) of DARTSERVE_TLS_CLIENT_CERT",
    "DARTSERVE_API_KEYS": "comma-separated API keys the gateway accepts as 'Authorization: Bearer KEY' (default: none, the gateway is open)",
    "DARTSERVE_API_KEYS_FILE": "a file of API keys, one per line (a mounted secret); adds to DARTSERVE_API_KEYS",
    "DARTSERVE_API_KEY": "the key `dartserve batch` sends to the gateway (client side)",
    "DARTSERVE_OPEN_PATHS": "comma-separated paths served without a key (default /healthz,/readyz,/metrics)",
    "DARTSERVE_BATCH_TTL_S": "lifetime of a batch's requests, status and results (default 86400)",
    "DARTSERVE_BATCH_MAX_REQUESTS": "most requests in one batch (default 50000)",
    "DARTSERVE_BATCH_MAX_MB": "largest batch upload (default 256)",
    "DARTSERVE_BATCH_RETRIES": "retries of a batch item while a stage is unavailable (not merely at its call limit), with backoff 1, 2, 4 ... 30 s (default 6)",
    "DARTSERVE_BATCH_VISIBILITY_S": "seconds before a batch item taken by a worker that died is delivered again (default 300)",
    "DARTSERVE_BATCH_NAMESPACE": "the prefix of the batch queue (the Redis list NAMESPACE:batches) and of every batch key in the batch Redis: deployments that share a Redis see and answer only their own namespace's batches; 1 to 64 letters, digits, '.', '_' or '-' (default: dartserve- and 12 hex digits of the model's config.json, so that deployments of different models never share one)",
    "DARTSERVE_BATCH_CONCURRENCY": "batch items a worker answers at once, each a request of its own to the engine core, where they share its steps: the batch worker that `dartserve serve` runs in its process (0: none; at most DARTSERVE_MAX_NUM_SEQS) and `dartserve worker` (default: half of DARTSERVE_MAX_NUM_SEQS, leaving the rest to interactive requests)",
}

PLACEHOLDER = "replace-me"  # how the secrets shipped in k8s/base begin
TLS_FILES = ("tls_cert", "tls_key", "tls_client_ca", "tls_ca", "tls_client_cert", "tls_client_key")
DEFAULT_PORTS = {"gateway": 8000, "vision": 50051, "pruner": 50052, "generator": 50053}
DEFAULT_METRICS_PORTS = {"vision": 9101, "pruner": 9102, "generator": 9103}


@dataclass(frozen=True)
class Settings:
    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    batch_redis_url: str | None = None  # None: redis_url
    host: str = "127.0.0.1"
    port: int | None = None
    metrics_port: int | None = None  # 0: no metrics server
    vision_addr: str = "127.0.0.1:50051"
    pruner_addr: str = "127.0.0.1:50052"
    generator_addr: str = "127.0.0.1:50053"
    pruning: dict = field(default_factory=lambda: dict(DEFAULT_PRUNING))
    ttl_s: int = DEFAULT_TTL_S
    memory_store_mb: int = 4096
    kv_cache_mb: float | None = None  # None: from the device's free memory
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = MAX_NUM_SEQS
    rpc_timeout_s: float = 60.0
    max_message_mb: int = 32
    max_image_pixels: int = MAX_PIXELS
    max_images: int = 8
    image_url_hosts: tuple[str, ...] = ()
    workers: int = 8
    max_queue: int = 32
    drain_s: float = 2.0
    connection_age_s: float = 120.0
    max_requests: int = 64
    max_uploads: int = 256
    body_timeout_s: float = 30.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # never printed or logged
    stage_token: str | None = field(default=None, repr=False)  # never printed or logged
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_ca: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    open_paths: tuple[str, ...] = ("/healthz", "/readyz", "/metrics")
    batch_ttl_s: int = 86400
    batch_max_requests: int = 50_000
    batch_max_mb: int = 256
    batch_retries: int = 6
    batch_visibility_s: int = 300
    batch_namespace: str | None = None  # None: named after the model (services.batches.namespace)
    batch_concurrency: int | None = None  # None: half of max_num_seqs

    @classmethod
    def from_env(cls, environ=None) -> Settings:
        env = os.environ if environ is None else environ
        unknown = sorted(k for k in env if k.startswith("DARTSERVE_") and k not in ENVIRONMENT)
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {sorted(ENVIRONMENT)}")

        def read(name, convert, default, least=None):
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = convert(raw)
            except ValueError as error:
                raise ValueError(f"{name}={raw!r}: {error}") from None
            if convert in (int, float) and value < (1 if least is None else least):
                raise ValueError(f"{name}={raw!r}: must be at least {1 if least is None else least}")
            return value

        pruning = read("DARTSERVE_PRUNING", json.loads, dict(DEFAULT_PRUNING))
        if "DARTSERVE_PRUNING" in env:  # fail at start-up, not on the first request
            from dartserve.pruning.config import PruningConfig  # loads torch, which a probe does without

            PruningConfig.from_dict(pruning)
        return cls(
            model=read("DARTSERVE_MODEL", str, None),
            device=read("DARTSERVE_DEVICE", str, cls.device),
            dtype=read("DARTSERVE_DTYPE", str, None),
            redis_url=read("DARTSERVE_REDIS_URL", str, cls.redis_url),
            batch_redis_url=read("DARTSERVE_BATCH_REDIS_URL", str, None),
            host=read("DARTSERVE_HOST", str, cls.host),
            port=read("DARTSERVE_PORT", int, None),
            metrics_port=read("DARTSERVE_METRICS_PORT", int, None, least=0),
            vision_addr=read("DARTSERVE_VISION_ADDR", str, cls.vision_addr),
            pruner_addr=read("DARTSERVE_PRUNER_ADDR", str, cls.pruner_addr),
            generator_addr=read("DARTSERVE_GENERATOR_ADDR", str, cls.generator_addr),
            pruning=pruning,
            ttl_s=read("DARTSERVE_TTL_S", int, cls.ttl_s),
            memory_store_mb=read("DARTSERVE_MEMORY_STORE_MB", int, cls.memory_store_mb),
            kv_cache_mb=read("DARTSERVE_KV_CACHE_MB", float, None),
            max_num_batched_tokens=read("DARTSERVE_MAX_NUM_BATCHED_TOKENS", int, cls.max_num_batched_tokens),
            max_num_seqs=read("DARTSERVE_MAX_NUM_SEQS", int, cls.max_num_seqs),
            rpc_timeout_s=read("DARTSERVE_RPC_TIMEOUT_S", float, cls.rpc_timeout_s),
            max_message_mb=read("DARTSERVE_MAX_MESSAGE_MB", int, cls.max_message_mb),
            max_image_pixels=read("DARTSERVE_MAX_IMAGE_PIXELS", int, cls.max_image_pixels),
            max_images=read("DARTSERVE_MAX_IMAGES", int, cls.max_images),
            image_url_hosts=read("DARTSERVE_IMAGE_URL_HOSTS", lambda raw: tuple(h.strip() for h in raw.split(",") if h.strip()), ()),
            workers=read("DARTSERVE_WORKERS", int, cls.workers),
            max_queue=read("DARTSERVE_MAX_QUEUE", int, cls.max_queue, least=0),
            drain_s=read("DARTSERVE_DRAIN_S", float, cls.drain_s, least=0),
            connection_age_s=read("DARTSERVE_CONNECTION_AGE_S", float, cls.connection_age_s),
            max_requests=read("DARTSERVE_MAX_REQUESTS", int, cls.max_requests),
            max_uploads=read("DARTSERVE_MAX_UPLOADS", int, cls.max_uploads),
            body_timeout_s=read("DARTSERVE_BODY_TIMEOUT_S", float, cls.body_timeout_s),
            api_keys=_api_keys(env),
            stage_token=_stage_token(env.get("DARTSERVE_STAGE_TOKEN_FILE")),
            **{name: read(f"DARTSERVE_{name.upper()}", str, None) for name in TLS_FILES},
            open_paths=read("DARTSERVE_OPEN_PATHS", _paths, cls.open_paths),
            batch_ttl_s=read("DARTSERVE_BATCH_TTL_S", int, cls.batch_ttl_s),
            batch_max_requests=read("DARTSERVE_BATCH_MAX_REQUESTS", int, cls.batch_max_requests),
            batch_max_mb=read("DARTSERVE_BATCH_MAX_MB", int, cls.batch_max_mb),
            batch_retries=read("DARTSERVE_BATCH_RETRIES", int, cls.batch_retries, least=0),
            batch_visibility_s=read("DARTSERVE_BATCH_VISIBILITY_S", int, cls.batch_visibility_s),
            batch_namespace=read("DARTSERVE_BATCH_NAMESPACE", check_name, None),
            batch_concurrency=read("DARTSERVE_BATCH_CONCURRENCY", int, None, least=0),
        )

    def port_for(self, service: str) -> int:
        return self.port if self.port is not None else DEFAULT_PORTS[service]

    @property
    def metrics(self) -> bool:
        return self.metrics_port != 0

    def metrics_port_for(self, stage: str) -> int:
        return self.metrics_port if self.metrics_port is not None else DEFAULT_METRICS_PORTS[stage]

    @property
    def batch_redis(self) -> str:
        return self.batch_redis_url or self.redis_url

    @property
    def batch_in_flight(self) -> int:
        return self.batch_concurrency if self.batch_concurrency is not None else max(1, self.max_num_seqs // 2)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


def _api_keys(env) -> tuple[str, ...]:
    keys = [k.strip() for k in env.get("DARTSERVE_API_KEYS", "").split(",")]
    path = env.get("DARTSERVE_API_KEYS_FILE")
    if path:
        keys += [line.strip() for line in _secret("DARTSERVE_API_KEYS_FILE", path).splitlines()]
    keys = tuple(k for k in keys if k)
    if any(k.startswith(PLACEHOLDER) for k in keys):  # k8s/base/api-keys.txt, never to be served as is
        raise ValueError("an API key is still the placeholder; put real keys in DARTSERVE_API_KEYS(_FILE)")
    return keys


def _stage_token(path: str | None) -> str | None:
    if not path:
        return None
    token = _secret("DARTSERVE_STAGE_TOKEN_FILE", path).strip()
    if token.startswith(PLACEHOLDER):  # k8s/base/stage-token.txt, never to be used as is
        raise ValueError("DARTSERVE_STAGE_TOKEN_FILE still holds the placeholder; put a generated token there")
    # gRPC metadata values are printable ASCII.
    if len(token) < 16 or not all("!" <= c <= "~" for c in token):
        raise ValueError(f"DARTSERVE_STAGE_TOKEN_FILE: the token in {path} must be 16 or more printable ASCII characters, without spaces")
    return token


def _secret(name: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as secret:
            return secret.read()
    except OSError as error:
        raise ValueError(f"{name}: cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{name}: {path} is not UTF-8 text") from None


def _paths(raw: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not all(p.startswith("/") for p in paths):
        raise ValueError("paths start with /")
    return paths
