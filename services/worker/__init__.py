"""Batch workloads: their records in Redis, the Celery app and its task."""
