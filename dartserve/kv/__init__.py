"""KV caches: the ragged cache a pruned prefill leaves behind, its byte codec and its stores."""

from dartserve.kv.cache import RaggedKVCache
from dartserve.kv.codec import CacheMiss, EncodedCache, decode, encode
from dartserve.kv.store import MemoryStore, RedisStore, StoreUnavailable, cache_key

__all__ = ["CacheMiss", "EncodedCache", "MemoryStore", "RaggedKVCache", "RedisStore", "StoreUnavailable", "cache_key", "decode", "encode"]
