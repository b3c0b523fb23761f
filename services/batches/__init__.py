"""Batches: their store in Redis and the Celery queue of their items, which the gateway writes
and the worker reads."""
