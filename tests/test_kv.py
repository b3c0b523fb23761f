"""The KV cache codec and stores: bit-exact round trips, misses on anything stale or foreign,
and a real private redis-server."""

import os

import pytest
import torch

from dartserve.kv.codec import VERSION, CacheMiss, EncodedCache, decode, encode
from dartserve.kv.store import MemoryStore, RedisStore, StoreUnavailable, cache_key
from dartserve.engine.core import EngineCore
from dartserve.engine.requests import CoreRequest
from dartserve.models import SamplingConfig
from dartserve.pruning import PruningConfig
from processes import RedisServer
from tiny_checkpoints import make_image


def run(core, request) -> list:
    core.add_request(request)
    outputs = []
    while core.has_work:
        outputs += core.step()
    return outputs


def greedy_continuation(adapter, cache, first_token, steps=4):
    outputs = run(EngineCore(adapter), CoreRequest("r", cache=cache, feed=(first_token,), answer=(first_token,), sampling=SamplingConfig(max_new_tokens=steps + 1, ignore_eos=True)))
    return [first_token] + [t for o in outputs for t in o.tokens]


@pytest.mark.parametrize("pruning", [PruningConfig(method="none"), PruningConfig(method="dart", budget=10)], ids=["none", "dart"])
def test_round_trip_is_bit_exact_and_decodes_the_same(engine, pruning):
    adapter = engine.adapter
    request = engine.vision.encode([make_image(30)], "What is here?")
    (prefilled,) = run(EngineCore(adapter), CoreRequest("r", request, pruning, prefill_only=True))
    cache = prefilled.cache
    restored = decode(encode(cache, "model-a"), "model-a")
    for got, want in zip(restored.keys + restored.values, cache.keys + cache.values):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert [t.tolist() for t in restored.token_index] == [t.tolist() for t in cache.token_index]
    assert torch.equal(restored.next_position, cache.next_position)
    first = prefilled.tokens[0]
    assert greedy_continuation(adapter, restored, first) == greedy_continuation(adapter, cache, first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_dtypes(dtype):
    cache = small_cache(dtype)
    restored = decode(encode(cache, "m"), "m")
    assert all(torch.equal(a, b) for a, b in zip(restored.keys + restored.values, cache.keys + cache.values))


def small_cache(dtype=torch.float32):
    from dartserve.kv.cache import RaggedKVCache

    torch.manual_seed(0)
    keys = [torch.randn(1, 2, 10, 4).to(dtype), torch.randn(1, 2, 6, 4).to(dtype)]
    values = [torch.randn(1, 2, 10, 4).to(dtype), torch.randn(1, 2, 6, 4).to(dtype)]
    index = [torch.arange(10)[None], torch.tensor([[0, 1, 3, 5, 8, 9]])]
    return RaggedKVCache(keys, values, (0, 1), index, torch.tensor([10]))


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def resealed(encoded: EncodedCache, **changes) -> EncodedCache:
    """The manifest with fields changed (None: removed) under a checksum that holds."""
    import hashlib
    import json

    header = json.loads(encoded.manifest[6:-32])
    header.update(changes)
    body = json.dumps({k: v for k, v in header.items() if v is not None}).encode()
    return EncodedCache(encoded.manifest[:6] + body + hashlib.sha256(body).digest(), encoded.layers)


def test_anything_stale_or_damaged_is_a_miss():
    good = encode(small_cache(), "model-a")
    bad = {
        "other model": (good, "model-b"),
        "damaged manifest": (EncodedCache(flip(good.manifest, 20), good.layers), "model-a"),
        "damaged layer": (EncodedCache(good.manifest, [good.layers[0], flip(good.layers[1], 5)]), "model-a"),
        "missing layer": (EncodedCache(good.manifest, good.layers[:1]), "model-a"),
        "truncated layer": (EncodedCache(good.manifest, [good.layers[0], good.layers[1][:-4]]), "model-a"),
        "other version": (EncodedCache(good.manifest[:4] + (VERSION + 1).to_bytes(2, "little") + good.manifest[6:], good.layers), "model-a"),
        "garbage": (EncodedCache(b"\x00" * 64, good.layers), "model-a"),
        "empty": (EncodedCache(b"", []), "model-a"),
        "no checksums": (resealed(good, checksums=None), "model-a"),
        "a checksum short": (resealed(good, checksums=["0" * 64]), "model-a"),
        "no positions": (resealed(good, token_index=None), "model-a"),
        # Sealed by a writer that got it wrong: the header disagrees with itself.
        "positions short of the slots": (resealed(good, token_index=[list(range(10)), [0, 1, 3]]), "model-a"),
        "more layer groups than layers": (resealed(good, layer_group=[0, 1, 1, 1]), "model-a"),
        "a group with no positions": (resealed(good, layer_group=[0, 2]), "model-a"),
        "positions not numbers": (resealed(good, token_index=[["a"] * 10, ["b"] * 6]), "model-a"),
    }
    for name, (encoded, fingerprint) in bad.items():
        with pytest.raises(CacheMiss):
            decode(encoded, fingerprint)


def test_keys_separate_models_images_prompts_and_configs():
    base = ("m", ["img1"], [1, 2, 3], PruningConfig(method="dart", budget=64).to_dict())
    variants = [
        ("m2", ["img1"], [1, 2, 3], base[3]),
        ("m", ["img2"], [1, 2, 3], base[3]),
        ("m", ["img1", "img1"], [1, 2, 3], base[3]),
        ("m", ["img1"], [1, 2, 4], base[3]),
        ("m", ["img1"], [1, 2, 3], PruningConfig(method="dart", budget=63).to_dict()),
        ("m", ["img1"], [1, 2, 3], PruningConfig(method="dart", budget=64, layer=3).to_dict()),
    ]
    keys = {cache_key(*base)} | {cache_key(*v) for v in variants}
    assert len(keys) == 1 + len(variants)
    assert cache_key(*base) == cache_key(*base)


def test_memory_store_expires_and_needs_every_layer():
    store = MemoryStore()
    encoded = encode(small_cache(), "m")
    store.put("k", encoded, ttl_s=60)
    assert store.get("k", 2) == encoded
    assert store.get("k", 3) is None
    assert store.get("other", 2) is None
    store.put("short", encoded, ttl_s=0)
    assert store.get("short", 2) is None


def test_memory_store_makes_room_by_dropping_what_expires_first():
    store = MemoryStore(max_bytes=2500)
    for i, ttl in enumerate((50, 10, 30)):
        store.set_value(f"k{i}", bytes(1000), ttl_s=ttl)
    assert [store.get_value(f"k{i}") is not None for i in range(3)] == [True, False, True]
    encoded = EncodedCache(b"m", [bytes(1000)])
    store.put("kv", encoded, ttl_s=60)
    assert store.get("kv", 1) == encoded and store.get_value("k2") is None and store.get_value("k0") == bytes(1000)
    # Read with a new TTL, k0 lives longest now: the next write drops the KV cache instead.
    assert store.get_values(["k0"], refresh_ttl_s=120) == [bytes(1000)]
    store.set_value("k3", bytes(1000), ttl_s=90)
    assert store.get("kv", 1) is None and store.get_value("k0") == store.get_value("k3") == bytes(1000)
    # What can never fit is not kept, and takes nothing with it; holds are not evicted.
    token = store.claim("hold", ttl_s=1)
    store.put("huge", EncodedCache(b"m", [bytes(3000)]), ttl_s=600)
    assert store.get("huge", 1) is None and store.get_value("k0") == store.get_value("k3") == bytes(1000)
    store.set_value("k4", bytes(1000), ttl_s=600)
    assert store.claim("hold", ttl_s=1) is None
    store.release("hold", token)
    assert store.claim("hold", ttl_s=1)


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer()
    yield server.url
    server.stop()


def test_redis_refusing_commands_is_store_unavailable(redis_url):
    """Out of memory (maxmemory with noeviction), as a full or read-only Redis refuses writes:
    the store fails the way it does when Redis is down, which the services answer with a 503."""
    import redis

    client, store = redis.Redis.from_url(redis_url), RedisStore.from_url(redis_url)
    value = EncodedCache(b"manifest", [b"x" * 1_000_000])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 100_000)
    try:
        with pytest.raises(StoreUnavailable, match="refused the command.*maxmemory"):
            store.put("dartserve:test:full", value, ttl_s=60)
    finally:
        client.config_set("maxmemory", 0)
    store.put("dartserve:test:full", value, ttl_s=60)
    assert store.get("dartserve:test:full", 1) == value


def test_claims_hold_until_released_by_their_holder_or_expired(redis_url):
    import time

    key = "dartserve:test:claim"
    for store in (MemoryStore(), RedisStore.from_url(redis_url)):
        token = store.claim(key, ttl_s=30)
        assert token and store.claim(key, ttl_s=30) is None
        store.release(key, "another holder's token")
        assert store.claim(key, ttl_s=30) is None
        store.release(key, token)
        assert store.claim(key, ttl_s=1)
        time.sleep(1.1)  # a holder that died: its claim lapses
        assert store.claim(key, ttl_s=30)


def test_redis_store_round_trip_with_ttl(redis_url):
    store = RedisStore.from_url(redis_url)
    encoded = encode(small_cache(torch.bfloat16), "m")
    store.put("dartserve:kv:test", encoded, ttl_s=30)
    assert store.get("dartserve:kv:test", 2) == encoded
    keys = store.client.keys("dartserve:kv:test*")
    assert len(keys) == 3
    assert all(0 < store.client.ttl(k) <= 30 for k in keys)
    store.client.delete("dartserve:kv:test:layer:1")
    assert store.get("dartserve:kv:test", 2) is None


def test_redis_store_values_of_every_size_round_trip(redis_url):
    """The store's client writes values over 6000 bytes straight to the socket and joins the
    rest into one buffer: values on both sides of that cut, and empty ones, come back exact."""
    store = RedisStore.from_url(redis_url)
    values = {f"dartserve:test:size:{n}:é": os.urandom(n) for n in (0, 1, 5999, 6000, 6001, 305_000, 3_000_000)}
    store.set_values(values, ttl_s=30)
    assert store.get_values(list(values)) == list(values.values())
