"""KV caches: the ragged cache a pruned prefill leaves behind."""

from dartserve.kv.cache import RaggedKVCache

__all__ = ["RaggedKVCache"]
