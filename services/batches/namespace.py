"""The namespace of a deployment's batches: one prefix for the Celery queue and every batch key in
the batch Redis, so that deployments sharing a Redis never see, or answer, each other's batches.

It is ``DARTSERVE_BATCH_NAMESPACE`` where set, else named after the model's configuration, which
every process of a deployment can read without loading weights: the distributed gateway and a
worker over gRPC load only the processor and the configuration.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re

from dartserve.demo import default_model

QUEUE = "batches"  # the Celery queue: the Redis list NAMESPACE:batches
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    """An explicit namespace: letters, digits, '.', '_' and '-', up to 64, so that it can neither
    reach into another namespace's keys (':') nor move a key's Redis Cluster slot ('{')."""
    if not NAME.match(name):
        raise ValueError("a batch namespace is 1 to 64 letters, digits, '.', '_' or '-', beginning with a letter or digit")
    return name


def batch_namespace(settings) -> str:
    return settings.batch_namespace or model_namespace(settings.model or default_model())


@functools.cache
def model_namespace(model: str) -> str:
    """``dartserve-`` and 12 hex digits of the model's ``config.json``, wherever the checkpoint
    lies and whichever transformers wrote it. Fine-tunes of one configuration share it: their
    deployments need names of their own on a shared Redis."""
    from transformers.utils import cached_file

    with open(cached_file(model, "config.json"), encoding="utf-8") as file:
        config = json.load(file, object_hook=lambda d: {k: v for k, v in d.items() if k not in ("_name_or_path", "transformers_version")})
    return "dartserve-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def queue_key(namespace: str) -> str:
    """The Redis list that holds the namespace's queued items (what KEDA's scaler reads)."""
    return f"{namespace}:{QUEUE}"
