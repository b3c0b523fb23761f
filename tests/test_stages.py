"""The stages over a store, in process: multi-token turns, split sampling, claim checks and
KV handles that go missing or arrive damaged, settings, and ``dartserve serve`` as a process."""

import base64
import io
import json
import time

import httpx
import pytest
import torch

from dartserve.kv import blob
from dartserve.kv.codec import CacheMiss
from dartserve.kv.store import MemoryStore
from dartserve.models.decode import SamplingConfig
from dartserve.pruning import PruningConfig
from dartserve.stages import DecodeStep, PrefillStep, StageMiss, VisionStep, visible_text
from processes import dartserve_process, free_port, stop, wait_until
from services.config import DEFAULT_PRUNING, Settings
from stages_in_process import StagesInProcess
from services.frontend.pipeline import Final, Question
from tiny_checkpoints import make_image

PROMPT = "What is shown here?"


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def sse_json(text: str) -> list[dict]:
    """A server-sent event stream's JSON events, in order ([DONE] left out)."""
    return [json.loads(event.removeprefix("data: ")) for event in text.split("\n\n") if event.startswith("data: {")]


def steps(engine, store=None):
    store = store or MemoryStore()
    return StagesInProcess(VisionStep(engine, store), PrefillStep(engine, store), DecodeStep(engine, store)), store


def run(backend, images, prompt, pruning, sampling) -> Final:
    return [e for e in backend.answer(Question(images, [{"role": "user", "content": prompt}], pruning, sampling)) if isinstance(e, Final)][0]


def test_sampling_split_over_the_stages_equals_the_engine(engines):
    engine = engines["llava"]
    backend, _ = steps(engine)
    image = make_image(4)
    for seed in range(3):
        sampling = SamplingConfig(max_new_tokens=10, temperature=1.3, top_p=0.9, seed=seed)
        pruning = PruningConfig(budget=12)
        final = run(backend, [png(image)], PROMPT, pruning, sampling)
        expected = engine.generate([image], PROMPT, pruning, sampling)
        assert final.token_ids == expected.token_ids
        assert final.text == expected.text.strip()


class ForgetfulStore(MemoryStore):
    """A real in-memory store that loses the next value written under a key with ``prefix``,
    as Redis does when it evicts a key between two stages."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.forgotten = prefix, 0

    def set_values(self, items, ttl_s=600):
        super().set_values(items, ttl_s)
        for key in items:
            if key.startswith(self.prefix) and not self.forgotten:
                self.forgotten += 1
                self._values.pop(key)

    def put(self, key, encoded, ttl_s=600):
        super().put(key, encoded, ttl_s)
        if key.startswith(self.prefix) and not self.forgotten:
            self.forgotten += 1
            self._values.pop(f"{key}:manifest")


@pytest.mark.parametrize("prefix", ["dartserve:prompt:", "dartserve:vision:", "dartserve:kv:"])
def test_a_value_evicted_between_stages_is_recomputed(engines, prefix):
    engine = engines["llava"]
    store = ForgetfulStore(prefix)
    backend, _ = steps(engine, store)
    image, pruning, sampling = make_image(5), PruningConfig(budget=12), SamplingConfig(max_new_tokens=6)
    final = run(backend, [png(image)], PROMPT, pruning, sampling)
    assert store.forgotten == 1
    assert final.token_ids == engine.generate([image], PROMPT, pruning, sampling).token_ids


def test_a_recomputed_prefill_that_picks_another_first_token_is_a_503_not_a_spliced_answer(engines):
    """A streamed first token is shown before decoding starts; if the KV cache then goes and
    the prefill run again picks another (sampled, or a replica on other hardware), no answer
    can go on from it. Not streamed, the answer starts from the new one."""
    from dataclasses import replace

    from services.frontend.errors import Unavailable

    engine = engines["llava"]
    image, pruning = make_image(5), PruningConfig(budget=12)
    firsts = [engine.generate([image], PROMPT, pruning, SamplingConfig(max_new_tokens=6, temperature=1.0, seed=seed)).token_ids[0] for seed in range(30)]
    shown = next(seed for seed in range(30) if visible_text(engine, [firsts[seed]]))  # the stream shows it at once
    other = next(seed for seed in range(30) if firsts[seed] != firsts[shown])
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=shown)

    class OtherReplica(PrefillStep):
        """Prefills as a second replica whose sampling draws differently, from its second call on."""

        calls = 0

        def prefill(self, prompt_ref, pruning, sampling, image_hashes=(), wanted=None):
            self.calls += 1
            return super().prefill(prompt_ref, pruning, replace(sampling, seed=other) if self.calls > 1 else sampling, image_hashes, wanted)

    store = ForgetfulStore("dartserve:kv:")
    backend = StagesInProcess(VisionStep(engine, store), OtherReplica(engine, store), DecodeStep(engine, store))
    with pytest.raises(Unavailable, match="another first token"):
        run(backend, [png(image)], PROMPT, pruning, sampling)
    assert store.forgotten == 1
    store = ForgetfulStore("dartserve:kv:")
    backend = StagesInProcess(VisionStep(engine, store), OtherReplica(engine, store), DecodeStep(engine, store))
    question = Question([png(image)], [{"role": "user", "content": PROMPT}], pruning, sampling)
    final = [e for e in backend.answer(question, stream=False) if isinstance(e, Final)][0]
    assert store.forgotten == 1 and final.token_ids[0] == firsts[other] and final.text == engine.generator.detokenize(final.token_ids).strip()


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get_values(self, keys, refresh_ttl_s=None):
        self.reads += 1
        return super().get_values(keys, refresh_ttl_s)


def test_the_image_hashes_make_the_prefill_read_the_store_once(engines):
    engine = engines["llava"]
    store = CountingStore()
    vision, pruner = VisionStep(engine, store), PrefillStep(engine, store)
    encoded = vision.encode([png(make_image(7)), png(make_image(8))], PROMPT)
    sampling = SamplingConfig()
    hints = {"given": encoded.image_hashes, "none": [], "wrong": ["0" * 64, encoded.image_hashes[1]]}
    results, reads = {}, {}
    for name, hashes in hints.items():
        store.reads = 0
        results[name] = pruner.prefill(encoded.prompt_ref, PruningConfig(budget=12), sampling, hashes)
        reads[name] = store.reads
    assert reads == {"given": 1, "none": 2, "wrong": 2}
    assert len({(r.kv_handle, r.first_token) for r in results.values()}) == 1
    with pytest.raises(ValueError, match="SHA-256"):
        pruner.prefill(encoded.prompt_ref, PruningConfig(budget=12), sampling, ["dartserve:kv:*"])


def test_missing_and_damaged_values_are_misses_never_used(engines):
    engine = engines["llava"]
    store = MemoryStore()
    vision, pruner, decoder = VisionStep(engine, store), PrefillStep(engine, store), DecodeStep(engine, store)
    with pytest.raises(StageMiss):
        pruner.prefill("dartserve:prompt:gone", PruningConfig(), SamplingConfig())
    with pytest.raises(StageMiss):
        list(decoder.generate("dartserve:kv:gone", SamplingConfig(), 1))
    encoded = vision.encode([png(make_image(6))], PROMPT)
    damaged = bytearray(store.get_value(encoded.prompt_ref))
    damaged[100] ^= 1
    store.set_value(encoded.prompt_ref, bytes(damaged))
    with pytest.raises(StageMiss):
        pruner.prefill(encoded.prompt_ref, PruningConfig(), SamplingConfig())
    # A damaged feature value is encoded again rather than used.
    feature_key = f"dartserve:vision:{engine.adapter.fingerprint}:{encoded.image_hashes[0]}"
    good = store.get_value(feature_key)
    store.set_value(feature_key, good[:-1] + bytes([good[-1] ^ 1]))
    assert vision.encode([png(make_image(6))], PROMPT).images_cached == 0
    assert vision.encode([png(make_image(6))], PROMPT).images_cached == 1


def test_blob_rejects_other_models_kinds_and_damage():
    data = blob.pack("features", "model-a", {"x": torch.arange(6, dtype=torch.float32).view(2, 3)}, {"n": 1})
    tensors, meta = blob.unpack(data, "features", "model-a")
    assert torch.equal(tensors["x"], torch.arange(6, dtype=torch.float32).view(2, 3)) and meta == {"n": 1}
    for bad, kind, model in [(data, "features", "model-b"), (data, "prompt", "model-a"), (data[:-1], "features", "model-a"), (b"nope", "features", "model-a")]:
        with pytest.raises(CacheMiss):
            blob.unpack(bad, kind, model)


def test_bad_images_are_value_errors(engines):
    vision = VisionStep(engines["llava"], MemoryStore(), max_pixels=64 * 64)
    for data in (b"", b"not an image", png(make_image(1))[:40]):
        with pytest.raises(ValueError):
            vision.encode([data], PROMPT)
    with pytest.raises(ValueError, match="over the limit"):
        vision.encode([png(make_image(1, (100, 100)))], PROMPT)
    with pytest.raises(ValueError, match="long side"):
        vision.encode([png(make_image(1, (2, 60)))], PROMPT)


def test_fingerprint_names_the_weights(engines, tmp_path):
    from dartserve.engine import Engine
    from tiny_checkpoints import build_tiny_checkpoint

    a = engines["llava"].adapter
    reloaded = Engine.load(str(build_tiny_checkpoint("llava", tmp_path / "same", seed=0))).adapter
    other = Engine.load(str(build_tiny_checkpoint("llava", tmp_path / "other", seed=1))).adapter
    assert len(a.fingerprint) == 32 and a.fingerprint == reloaded.fingerprint
    assert other.fingerprint != a.fingerprint  # the same config, other weights
    a.model.model.language_model.layers[0].mlp.up_proj.weight.data.view(-1)[:: 64] += 1e-3  # a middle slice
    del a.__dict__["fingerprint"]
    try:
        assert a.fingerprint != reloaded.fingerprint
    finally:
        a.model.model.language_model.layers[0].mlp.up_proj.weight.data.view(-1)[:: 64] -= 1e-3
        del a.__dict__["fingerprint"]


def test_shown_text_never_splits_a_character(engines):
    engine = engines["llava"]
    ids = engine.adapter.processor.tokenizer("é", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # a byte-level tokenizer spells it in two tokens
    from dartserve.stages import visible_text

    assert visible_text(engine, ids[:1]) == "" and visible_text(engine, ids) == "é"


def test_the_generator_rejects_handles_and_tokens_it_never_gave(engines):
    engine = engines["llava"]
    decoder = DecodeStep(engine, MemoryStore())
    vocabulary = engine.adapter.lm_head.out_features
    for handle, pending in (("", 1), ("dartserve:prompt:abc", 1), ("dartserve:kv:abc", -1), ("dartserve:kv:abc", vocabulary)):
        with pytest.raises(ValueError):
            list(decoder.generate(handle, SamplingConfig(), pending))


def local_conversations(store=None):
    from services.gateway.conversations import Conversations
    from services.gateway.turns import LocalLeases, TurnHolds

    return Conversations(store or MemoryStore(), 100, TurnHolds(LocalLeases()))


def test_damaged_or_foreign_conversation_records_are_unknown():
    from services.gateway.conversations import FIELDS

    conversations = local_conversations()
    whole = dict.fromkeys(FIELDS, 1) | {"pruning": PruningConfig(budget=64).to_dict()}
    for key, record in (("list", [1, 2]), ("partial", {"kv_handle": "dartserve:kv:x"}), ("whole", whole)):
        conversations.put(key, record)
    assert conversations.get("list") is None and conversations.get("partial") is None and conversations.get("whole") == whole
    # Stored under another key, changed by a byte, or plain JSON as the previous version wrote it: a miss.
    raw = conversations.store.get_value("whole")
    conversations.store.set_value("copied", raw)
    conversations.store.set_value("changed", raw.replace(b'"pending_token": 1', b'"pending_token": 2'))
    conversations.store.set_value("plain", json.dumps(whole).encode())
    assert [conversations.get(key) for key in ("copied", "changed", "plain")] == [None] * 3


def test_conversation_records_expire_before_their_cache():
    store = MemoryStore()
    local_conversations(store).put("k", {"a": 1}, age_s=60)
    expires, _ = store._values["k"]
    import time

    assert expires - time.monotonic() <= 40


def test_settings_come_from_the_environment():
    settings = Settings.from_env({"DARTSERVE_PORT": "9000", "DARTSERVE_PRUNING": '{"method": "fastv", "budget": 32}', "DARTSERVE_TTL_S": "30"})
    assert (settings.port_for("vision"), settings.pruning, settings.ttl_s) == (9000, {"method": "fastv", "budget": 32}, 30)
    assert Settings.from_env({}).port_for("gateway") == 8000
    assert Settings.from_env({"DARTSERVE_BATCH_RETRIES": "0"}).batch_retries == 0
    bad_settings = (
        {"DARTSERVE_PORTT": "1"}, {"DARTSERVE_PORT": "x"}, {"DARTSERVE_PRUNING": '{"method": "nope"}'}, {"DARTSERVE_PRUNING": "{"},
        {"DARTSERVE_TTL_S": "0"}, {"DARTSERVE_BATCH_VISIBILITY_S": "-5"}, {"DARTSERVE_BATCH_RETRIES": "-1"}, {"DARTSERVE_RPC_TIMEOUT_S": "0"},
    )
    for bad in bad_settings:
        with pytest.raises(ValueError):
            Settings.from_env(bad)


@pytest.fixture(scope="module")
def demo_client():
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.launch import embedded_gateway

    return TestClient(create_app(embedded_gateway(Settings(max_message_mb=1))))


def test_several_images_through_rest_and_chat_equal_the_engine(engine):
    """Two images in one request, as ``images`` on /v1/answer and as two image_url parts in a
    chat message, answered as the engine answers them, with the default pruning applied."""
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.launch import embedded_gateway

    images = [make_image(31, (120, 64)), make_image(32)]
    encoded = [base64.b64encode(png(image)).decode() for image in images]
    question = "Compare the two images in detail please."
    sampling = SamplingConfig(max_new_tokens=6)
    client = TestClient(create_app(embedded_gateway(Settings(), engine)))
    answer = client.post("/v1/answer", json={"images": encoded, "question": question, "max_new_tokens": 6})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = engine.generate(images, question, PruningConfig(**DEFAULT_PRUNING), sampling)
    assert body["answer"] == expected.text.strip()
    assert body["pruning"] == PruningConfig(**DEFAULT_PRUNING).applied(body["usage"]["vision_tokens"])
    assert body["pruning"]["budget"] == body["usage"]["kept_vision_tokens"]
    usage = body["usage"]
    assert (usage["vision_tokens"], usage["kept_vision_tokens"], usage["completion_tokens"]) == (
        expected.stats.vision_tokens, expected.stats.vision_tokens_kept, len(expected.token_ids))
    assert usage["vision_tokens"] == sum(engine.vision.encode([image], question).num_vision_tokens for image in images)
    timings = body["timings"]
    assert set(timings) == {"encode_ms", "prefill_ms", "selection_ms", "ttft_ms", "decode_ms", "kv_store_ms", "total_ms"}
    assert 0 < timings["selection_ms"] < timings["prefill_ms"] and timings["decode_ms"] >= 0
    assert timings["encode_ms"] + timings["prefill_ms"] < timings["ttft_ms"] < timings["total_ms"]
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}} for data in encoded]
    chat = client.post("/v1/chat/completions", json={
        "model": body["model"], "max_tokens": 6, "messages": [{"role": "user", "content": parts + [{"type": "text", "text": question}]}],
    })
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == body["answer"]


def test_gateway_edge_inputs_get_json_4xx(demo_client):
    from dartserve.demo.data import example

    item = example("test", 2)
    image = base64.b64encode(png(item.image)).decode()
    bad = [
        ("/v1/answer", {"json": {"image": image, "question": "x", "temperature": 1e-300}}, 400),
        ("/v1/answer", {"content": ('{"image": "%s", "question": "\\ud800"}' % image).encode(), "headers": {"content-type": "application/json"}}, 400),
        ("/v1/answer", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}}, 400),
        ("/v1/answer", {"content": b"[" * 5000 + b"]" * 5000, "headers": {"content-type": "application/json"}}, 400),
        ("/v1/answer", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data; boundary=y"}}, 400),
        ("/v1/answer", {"content": b"x" * (2 << 20), "headers": {"content-type": "application/json"}}, 413),
        ("/v1/answer", {"json": {"images": [image] * 9, "question": "x"}}, 400),  # DARTSERVE_MAX_IMAGES
        ("/v1/answer", {"json": {"image": image, "question": "red " * 5000}}, 400),  # past the model's context
        ("/v1/answer", {"json": {"image": base64.b64encode(png(make_image(0, (3000, 2)))).decode(), "question": "x"}}, 400),  # aspect ratio
        ("/v1/chat/completions", {"json": {"model": "dartserve-demo", "max_tokens": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}, {"type": "text", "text": "x"}]}]}}, 400),
    ]
    for path, kwargs, status in bad:
        reply = demo_client.post(path, **kwargs)
        assert reply.status_code == status, (kwargs.get("json"), reply.text[:200])
        assert set(reply.json()["error"]) == {"type", "message", "param"}


def test_what_a_request_cannot_use_is_refused_not_dropped(demo_client):
    from dartserve.demo.data import example

    image = base64.b64encode(png(example("test", 3).image)).decode()
    answer = {"image": image, "question": "what colour is the triangle ?"}
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}
    chat = {"model": "dartserve-demo", "messages": [{"role": "user", "content": [part, {"type": "text", "text": "what colour is the triangle ?"}]}]}

    def with_part(**changes):
        return chat | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": part["image_url"] | changes}, chat["messages"][0]["content"][1]]}]}

    refused = [
        ("/v1/answer", {"question": "what colour is the triangle ?"}, "image"),
        ("/v1/answer", {"question": answer["question"], "images": []}, "image"),
        ("/v1/answer", answer | {"image": "data:text/plain;base64," + image}, "image"),
        ("/v1/answer", answer | {"image": "file:///etc/passwd"}, "image"),
        ("/v1/answer", answer | {"conversation_id": ""}, "conversation_id"),
        ("/v1/answer", answer | {"pruning": {"method": "none", "budget": 8}}, "pruning"),
        ("/v1/answer", answer | {"pruning": {"method": "random", "pivot_image": 4}}, "pruning"),
        ("/v1/chat/completions", chat | {"max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", chat | {"temperature": "0.5"}, "temperature"),
        ("/v1/chat/completions", chat | {"stream": "yes"}, "stream"),
        ("/v1/chat/completions", chat | {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", chat | {"stream": True, "stream_options": {"junk": 1}}, "stream_options.junk"),
        ("/v1/chat/completions", chat | {"max_tokens": 1, "max_completion_tokens": 5}, "max_tokens"),
        ("/v1/chat/completions", chat | {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("/v1/chat/completions", chat | {"messages": [chat["messages"][0] | {"name": "bob"}]}, "messages.0.name"),
        ("/v1/chat/completions", with_part(detail="low"), "messages.0.content.0.image_url.detail"),
        ("/v1/chat/completions", with_part(url=image), "messages.0.content.0.image_url.url"),
        ("/v1/chat/completions", with_part(url="data:application/pdf;base64," + image), "messages.0.content.0.image_url.url"),
        ("/v1/chat/completions", chat | {"n": 2}, "n"),
        ("/v1/chat/completions", chat | {"messages": [*chat["messages"], {"role": "system", "content": "be brief"}]}, "messages.1"),
        ("/v1/chat/completions", chat | {"messages": [{"role": "system", "content": chat["messages"][0]["content"]}, {"role": "user", "content": "hi"}]}, "messages.0.content.0"),
    ]
    for path, body, param in refused:
        reply = demo_client.post(path, json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, (param, reply.text[:300])
    assert "max_new_tokens" not in demo_client.post("/v1/chat/completions", json=chat | {"max_tokens": 0}).json()["error"]["message"]
    # What only the stages can find (it needs the image's tokens) names its field too, in each API's names.
    found_late = [
        ("/v1/answer", answer | {"pruning": {"budget": 1000}}, "pruning.budget"),
        ("/v1/answer", answer | {"pruning": {"ratio": 0.005}}, "pruning.ratio"),  # 3 tokens, under DART's 4 image pivots
        ("/v1/answer", answer | {"pruning": {"layer": 100}}, "pruning.layer"),
        ("/v1/answer", answer | {"max_new_tokens": 5000}, "max_new_tokens"),
        ("/v1/answer", answer | {"image": base64.b64encode(b"not an image").decode()}, "image"),
        ("/v1/chat/completions", chat | {"max_tokens": 5000}, "max_tokens"),
    ]
    for path, body, param in found_late:
        reply = demo_client.post(path, json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, (param, reply.text[:300])
    text_plain = demo_client.post("/v1/chat/completions", content=json.dumps(chat), headers={"content-type": "text/plain"})
    assert text_plain.status_code == 415
    twice = demo_client.post("/v1/answer", files=[("question", (None, "one ?")), ("question", (None, "two ?")), ("image", (None, image))])
    assert twice.status_code == 400 and twice.json()["error"]["param"] == "question"
    # Accepted: a media type in capitals, a data URL scheme in capitals, and a data URL sent as a form field.
    reference = demo_client.post("/v1/answer", json=answer).json()["answer"]
    capitals = demo_client.post("/v1/answer", content=json.dumps(answer | {"image": "DATA:image/png;BASE64," + image}), headers={"content-type": "Application/JSON"})
    assert capitals.status_code == 200 and capitals.json()["answer"] == reference
    form = demo_client.post("/v1/answer", files=[("question", (None, answer["question"])), ("image", (None, "data:image/png;base64," + image))])
    assert form.status_code == 200 and form.json()["answer"] == reference
    upload = demo_client.post("/v1/answer", files=[("image", ("picture.png", base64.b64decode(image), "image/png")), ("question", (None, answer["question"]))])
    assert upload.status_code == 200 and upload.json()["answer"] == reference
    # Form fields that are not strings are JSON: a JSON string for image too, a list for images.
    for field in (("image", (None, json.dumps(image))), ("images", (None, json.dumps([image])))):
        encoded = demo_client.post("/v1/answer", files=[field, ("question", (None, answer["question"]))])
        assert encoded.status_code == 200 and encoded.json()["answer"] == reference, encoded.text


def test_pruning_as_applied_models_and_chat_usage_chunks(demo_client):
    from dartserve.demo.data import example

    image = base64.b64encode(png(example("test", 4).image)).decode()
    answer = {"image": image, "question": "how many objects are there ?", "max_new_tokens": 4}
    keep_all = demo_client.post("/v1/answer", json=answer | {"pruning": {"budget": None}}).json()
    assert keep_all["usage"]["kept_vision_tokens"] == keep_all["usage"]["vision_tokens"] == 576
    assert keep_all["pruning"] == {"method": "dart", "budget": 576, "layer": 2, "pivot_image": 4, "pivot_text": 4}
    none = demo_client.post("/v1/answer", json=answer | {"pruning": {"method": "none"}}).json()
    assert none["pruning"] == {"method": "none"}
    assert demo_client.post("/v1/answer", json=answer | {"pruning": {"method": "none", "budget": None, "layer": None}}).json()["pruning"] == {"method": "none"}
    fastv = demo_client.post("/v1/answer", json=answer | {"pruning": {"method": "fastv"}}).json()
    # The reply echoes the amount applied in tokens, where the default gives it as a ratio.
    assert fastv["pruning"] == {"method": "fastv", "budget": 64, "layer": 2} and fastv["usage"]["kept_vision_tokens"] == 64

    for seed in range(3):  # hot sampling picks tokens that show no text until the next one
        parsed = sse_json(demo_client.post("/v1/answer", json=answer | {"temperature": 100.0, "seed": seed, "stream": True, "max_new_tokens": 6}).text)
        deltas = [e["text"] for e in parsed if e["type"] == "delta"]
        assert all(deltas) and "".join(deltas).strip() == parsed[-1]["answer"], deltas

    assert demo_client.get("/v1/models/dartserve-demo").json()["id"] == "dartserve-demo"
    assert demo_client.get("/v1/models/other").status_code == 404
    not_allowed = demo_client.post("/v1/models")
    assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "GET"

    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image, "detail": "auto"}}
    chat = {"model": "dartserve-demo", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": [part, {"type": "text", "text": answer["question"]}]}]}

    def chunks(body):
        text = demo_client.post("/v1/chat/completions", json=body).text
        assert text.endswith("data: [DONE]\n\n")
        return sse_json(text)

    plain, counted = chunks(chat), chunks(chat | {"stream_options": {"include_usage": True}})
    assert not any("usage" in c for c in plain) and plain[-1]["dartserve"]["pruning"]["method"] == "dart"
    assert plain[-1]["choices"][0]["finish_reason"] and plain[-1]["dartserve"]["usage"]["kept_vision_tokens"] == 64
    assert [c["choices"] for c in counted[:-1]] == [c["choices"] for c in plain]
    usage = counted[-1]["usage"]
    assert counted[-1]["choices"] == [] and usage["completion_tokens"] == plain[-1]["dartserve"]["usage"]["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all(c["choices"][0]["delta"].get("content") != "" for c in plain[1:])  # no empty deltas past the role's


def test_a_follow_up_continues_from_kept_blocks_else_from_the_text_else_is_a_503_without_retry_after(demo_client):
    from dartserve.demo.data import example

    def conversation_hits():
        text = demo_client.get("/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith('dartserve_cache_hits_total{cache="conversation"}'))

    backend = demo_client.app.state.gateway.backend
    kv = backend.engine.loop.core.kv

    def release_blocks():  # as a full pool does
        while kv.evict_one():
            pass

    item = example("test", 7)
    first = demo_client.post("/v1/answer", json={"image": base64.b64encode(png(item.image)).decode(), "question": item.question}).json()
    before = conversation_hits()
    follow_up = {"conversation_id": first["conversation_id"], "question": "how many objects are there ?"}
    kept = demo_client.post("/v1/answer", json=follow_up).json()
    assert kept["usage"]["prefill_tokens"] < kept["usage"]["prompt_tokens"] and conversation_hits() == before + 1
    release_blocks()
    again = demo_client.post("/v1/answer", json=follow_up).json()  # the whole conversation, from its text
    assert again["usage"]["prefill_tokens"] == again["usage"]["prompt_tokens"] and conversation_hits() == before + 1
    release_blocks()
    backend.images._entries.clear()  # and the image, as the cache lets it go
    gone = demo_client.post("/v1/answer", json=follow_up)
    assert gone.status_code == 503 and "retry-after" not in gone.headers
    assert gone.json()["error"]["type"] == "service_unavailable" and gone.json()["error"]["param"] == "conversation_id"


def test_a_conversation_answers_one_turn_at_a_time(demo_client):
    from dartserve.demo.data import example
    from services.gateway import conversations as conv

    item = example("test", 9)
    first = demo_client.post("/v1/answer", json={"image": base64.b64encode(png(item.image)).decode(), "question": item.question}).json()
    cid, conversations = first["conversation_id"], demo_client.app.state.gateway.conversations
    follow_up = {"conversation_id": cid, "question": "how many objects are there ?", "max_new_tokens": 3}
    end_turn = conversations.begin_turn(conv.by_id("", cid))  # a turn being answered elsewhere
    busy = demo_client.post("/v1/answer", json=follow_up)
    assert busy.status_code == 409 and busy.json()["error"]["type"] == "conflict" and busy.json()["error"]["param"] == "conversation_id"
    end_turn()
    # However a turn ends (answered, streamed, refused), the conversation is free again.
    assert demo_client.post("/v1/answer", json=follow_up).status_code == 200
    streamed = demo_client.post("/v1/answer", json=follow_up | {"stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert demo_client.post("/v1/answer", json=follow_up | {"pruning": {"method": "none"}}).status_code == 400
    assert demo_client.post("/v1/answer", json=follow_up).status_code == 200
    assert len(conversations.get(conv.by_id("", cid))["messages"]) == 2 * 4  # every answered turn is in it


def test_the_embedded_store_holds_what_the_setting_allows(engines):
    from services.launch import embedded_gateway

    assert Settings.from_env({"DARTSERVE_MEMORY_STORE_MB": "16"}).memory_store_mb == 16
    gateway = embedded_gateway(Settings(memory_store_mb=16), engines["llava"])
    assert gateway.backend.images.max_bytes == gateway.conversations.store.max_bytes == 16 << 20


def test_a_turn_whose_hold_cannot_be_released_still_answers_and_frees_its_slot(engines, monkeypatch):
    """Redis failing just as a conversation's turn ends: the answer stands and the request's
    admission slot comes back (the hold on the conversation lapses by itself)."""
    from fastapi.testclient import TestClient

    from dartserve.kv.store import StoreUnavailable
    from services.gateway.app import create_app
    from services.launch import embedded_gateway

    client = TestClient(create_app(embedded_gateway(Settings(), engines["llava"])))
    gateway = client.app.state.gateway

    def unreachable(key, token):
        raise StoreUnavailable("Redis is unreachable: connection refused")

    monkeypatch.setattr(gateway.conversations.holds.leases, "release", unreachable)
    body = {"image": base64.b64encode(png(make_image(42))).decode(), "question": PROMPT, "max_new_tokens": 3}
    answered = client.post("/v1/answer", json=body | {"conversation_id": "held-1"})
    assert answered.status_code == 200 and answered.json()["conversation_id"] == "held-1"
    streamed = client.post("/v1/answer", json=body | {"conversation_id": "held-2", "stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert gateway.admission.active == 0


def break_after_first(backend, error):
    """Makes the in-process backend's token streams fail with ``error`` once they have shown text."""
    deltas = backend._deltas

    def broken(request):
        events = deltas(request)
        try:
            for event in events:
                yield event
                if event[2]:  # text the client has been sent: mid-stream
                    raise error
        finally:
            events.close()

    return broken


def test_a_failure_no_error_path_foresaw_is_a_json_500_and_ends_a_stream_with_an_error(engines, monkeypatch):
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.launch import embedded_gateway

    client = TestClient(create_app(embedded_gateway(Settings(), engines["llava"])))
    backend = client.app.state.gateway.backend
    monkeypatch.setattr(backend, "_deltas", break_after_first(backend, RuntimeError("a bug")))  # mid-stream
    body = {"image": base64.b64encode(png(make_image(43))).decode(), "question": PROMPT, "max_new_tokens": 3}
    failed = client.post("/v1/answer", json=body, headers={"X-Request-Id": "req-500"})
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error" and failed.headers["x-request-id"] == "req-500"
    streamed = client.post("/v1/answer", json=body | {"stream": True})
    events = sse_json(streamed.text)
    assert streamed.status_code == 200 and events[-1]["error"]["type"] == "server_error" and "[DONE]" not in streamed.text
    # The stream's failure counts under the status it would have had without the 200 sent.
    assert 'dartserve_requests_total{endpoint="/v1/answer",status="500"} 2.0' in client.get("/metrics").text
    assert client.app.state.gateway.admission.active == 0


@pytest.mark.parametrize(
    "failure, status, kind",
    [
        ("store", 503, "service_unavailable"),  # the answer's new KV cannot be written: Redis went away
        ("overloaded", 429, "rate_limit_exceeded"),  # a stage refuses the call: at its limit
    ],
)
def test_a_stream_that_fails_after_its_first_token_ends_with_the_error_and_counts_it(monkeypatch, failure, status, kind):
    from fastapi.testclient import TestClient

    from dartserve.demo.data import example
    from services.gateway.app import create_app
    from services.frontend.errors import Overloaded, Unavailable
    from services.launch import embedded_gateway

    client = TestClient(create_app(embedded_gateway(Settings())))  # the demo model: answers have text
    backend = client.app.state.gateway.backend
    error = Unavailable("Redis is unreachable: connection refused") if failure == "store" else Overloaded("a stage is at its limit")
    monkeypatch.setattr(backend, "_deltas", break_after_first(backend, error))
    item = example("test", 3)
    image = base64.b64encode(png(item.image)).decode()
    body = {"image": image, "question": item.question, "max_new_tokens": 4, "stream": True}
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}, {"type": "text", "text": item.question}]
    chat = {"model": client.app.state.gateway.model_name, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": content}]}
    for path, request in (("/v1/answer", body), ("/v1/chat/completions", chat)):
        streamed = client.post(path, json=request)
        events = sse_json(streamed.text)
        assert streamed.status_code == 200 and len(events) >= 2 and "[DONE]" not in streamed.text
        # What failed, and where, is for the log: the client gets a message that says neither.
        public = (Overloaded if failure == "overloaded" else Unavailable).public
        assert events[-1]["error"] == {"type": kind, "message": public, "param": None} and "Redis" not in public
        # Not streamed, the same failure is the reply's status, with the same error.
        replied = client.post(path, json=request | {"stream": False})
        assert replied.status_code == status and replied.json()["error"]["type"] == kind and replied.headers["retry-after"] == "1"
    metrics = client.get("/metrics").text
    for path in ("/v1/answer", "/v1/chat/completions"):
        assert f'dartserve_requests_total{{endpoint="{path}",status="{status}"}} 2.0' in metrics
        assert f'dartserve_requests_total{{endpoint="{path}",status="200"}}' not in metrics
    assert client.app.state.gateway.admission.active == 0


def test_a_client_that_leaves_a_stream_is_counted_as_499_and_frees_its_slot(engines, monkeypatch):
    """A real server (uvicorn on loopback) and a client that hangs up after the first streamed
    token; the decode waits until the answer's response has been told, then goes on. The
    request counts as a 499, not a 200 and not nothing, its decode stops, and its slot is
    free again."""
    import threading

    import uvicorn
    from fastapi.testclient import TestClient
    from starlette.responses import StreamingResponse

    from services.gateway.app import create_app
    from services.launch import embedded_gateway

    app = create_app(embedded_gateway(Settings(), engines["llava"]))  # a random model: long answers
    gateway = app.state.gateway
    backend = gateway.backend
    deltas, left, closed, produced = backend._deltas, threading.Event(), threading.Event(), []

    def held_until_the_client_left(request):
        try:
            for event in deltas(request):
                produced.append(event)
                yield event
                if event[2]:  # out to the client: the stream reads the next one in a later step
                    left.wait(30)
        finally:
            closed.set()

    listen = StreamingResponse.listen_for_disconnect

    async def listen_and_tell(response, receive):  # the answer's own response has heard it
        await listen(response, receive)
        left.set()

    body = {"image": base64.b64encode(png(make_image(45))).decode(), "question": PROMPT, "max_new_tokens": 24}
    with TestClient(app) as client:  # the whole answer, for comparison
        whole = client.post("/v1/answer", json=body).json()["usage"]["completion_tokens"]
    assert whole == 24
    monkeypatch.setattr(StreamingResponse, "listen_for_disconnect", listen_and_tell)
    monkeypatch.setattr(backend, "_deltas", held_until_the_client_left)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the gateway")
        url = f"http://127.0.0.1:{server.config.port}"
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", f"{url}/v1/answer", json=body | {"stream": True}) as response:
                assert response.status_code == 200
                assert next(line for line in response.iter_lines() if line.startswith("data: {"))
            # Leaving the block closes the connection mid-answer.
            wait_until(lambda: left.is_set() and gateway.admission.active == 0, "the slot's release", timeout_s=30)
            counts = [line for line in client.get(f"{url}/metrics").text.splitlines() if line.startswith("dartserve_requests_total{")]
        assert sorted(counts) == [  # the whole answer's 200, and the stream the client left
            'dartserve_requests_total{endpoint="/v1/answer",status="200"} 1.0',
            'dartserve_requests_total{endpoint="/v1/answer",status="499"} 1.0',
        ]
        # The decode was stopped once the client was known to have left, not run to its end.
        assert closed.is_set() and len(produced) < whole
    finally:
        left.set()
        server.should_exit = True
        thread.join(30)


def test_gateway_limits_bodies_without_a_length_and_keeps_threads_for_health(tmp_path):
    import anyio.to_thread
    from fastapi.testclient import TestClient

    from dartserve.demo.data import example
    from services.gateway.app import SPARE_THREADS, create_app
    from services.launch import embedded_gateway

    item = example("test", 8)
    body = json.dumps({"image": base64.b64encode(png(item.image)).decode(), "question": item.question, "max_new_tokens": 2}).encode()

    def chunked(data: bytes, size: int = 4096):
        yield from (data[i : i + size] for i in range(0, len(data), size))

    with TestClient(create_app(embedded_gateway(Settings(max_message_mb=1, max_requests=5)))) as client:
        # Every admitted answer holds a thread; more are left for readiness and batch calls.
        assert client.portal.call(lambda: anyio.to_thread.current_default_thread_limiter().total_tokens) == 5 + SPARE_THREADS
        for path in ("/v1/answer", "/v1/chat/completions"):
            reply = client.post(path, content=chunked(b"x" * (2 << 20)), headers={"content-type": "application/json"})
            assert reply.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in reply.request.headers
            assert reply.status_code == 413 and reply.json()["error"]["type"] == "request_too_large"
        sent = client.post("/v1/answer", content=chunked(body), headers={"content-type": "application/json"})
        assert sent.status_code == 200 and sent.json()["usage"]["completion_tokens"] == 2
        # At the limit a request is refused before its body is read: even a malformed one gets the 429.
        held = [client.app.state.gateway.admission.enter() for _ in range(5)]
        for path in ("/v1/answer", "/v1/chat/completions"):
            assert client.post(path, content=b"{not json", headers={"content-type": "application/json"}).status_code == 429
        for slot in held:
            slot.release()
        for path in ("/v1/answer", "/v1/chat/completions"):
            assert client.post(path, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
        # Paths no route serves share one metrics series, however many a client makes up.
        assert all(client.get(f"/made-up/{n}").status_code == 404 for n in range(3))
        lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith("dartserve_requests_total{")]
        assert [line for line in lines if "made-up" in line] == []
        assert 'dartserve_requests_total{endpoint="unmatched",status="404"} 3.0' in lines


def test_chat_history_with_other_pruning_starts_afresh(demo_client):
    from dartserve.demo.data import example

    item = example("test", 4)
    url = "data:image/png;base64," + base64.b64encode(png(item.image)).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": item.question}]}]
    body = {"model": "dartserve-demo", "temperature": 0}
    first = demo_client.post("/v1/chat/completions", json=body | {"messages": messages, "pruning": {"method": "none"}}).json()
    messages += [first["choices"][0]["message"], {"role": "user", "content": "how many objects are there ?"}]
    same = demo_client.post("/v1/chat/completions", json=body | {"messages": messages, "pruning": {"method": "none"}}).json()
    other = demo_client.post("/v1/chat/completions", json=body | {"messages": messages, "pruning": {"budget": 8}}).json()
    assert same["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert other["dartserve"]["usage"]["kept_vision_tokens"] == 8


def test_dartserve_serve_answers_in_embedded_mode(tmp_path):
    from dartserve.demo.data import example

    port = free_port()
    process = dartserve_process("serve", {"DARTSERVE_PORT": str(port)}, tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, "dartserve serve", process, tmp_path / "serve.log")
        item = example("test", 3)
        reply = httpx.post(f"{url}/v1/answer", json={"image": base64.b64encode(png(item.image)).decode(), "question": item.question}, timeout=60)
        assert reply.status_code == 200 and reply.json()["model"] == "dartserve-demo"
        assert httpx.get(f"{url}/readyz").json()["ready"] is True
    finally:
        stop([process])


def prefilled_request(engine, store, sampling):
    """The test image's prompt prefilled into ``store``, and a generator request that decodes from it."""
    from services.convert import sampling_to_proto
    from services.rpc.dartserve.v1 import generator_pb2

    done = PrefillStep(engine, store).prefill(VisionStep(engine, store).encode([png(make_image(8))], PROMPT).prompt_ref, PruningConfig(budget=12), sampling)
    return done, generator_pb2.GenerateRequest(kv_handle=done.kv_handle, sampling=sampling_to_proto(sampling), pending_token=done.first_token)


def generator_stub(server):
    import grpc

    from services.rpc.dartserve.v1 import generator_pb2_grpc

    return generator_pb2_grpc.GeneratorServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))


def stored_handles(store) -> set[str]:
    """The KV handles in ``store``: a finished answer adds its longer cache under a second one."""
    return {key.removesuffix(":manifest") for key in store._values if key.endswith(":manifest")}


def test_a_cancelled_stream_stops_decoding(engines):
    from services.generator.server import serve

    engine = engines["llava"]
    store = MemoryStore()
    done, request = prefilled_request(engine, store, SamplingConfig(max_new_tokens=400, temperature=1.0, seed=1, stop_token_ids=()))
    server = serve(DecodeStep(engine, store), Settings(metrics_port=0, drain_s=0), 0)
    try:
        stream = generator_stub(server).Generate(request, timeout=60)
        next(stream)
        stream.cancel()
        time.sleep(1.0)
        assert stored_handles(store) == {done.kv_handle}
    finally:
        server.stop(grace_s=1)


def test_complete_sends_the_streamed_answer_in_one_message_and_stops_past_its_deadline(engines):
    import grpc

    from services.generator.server import serve

    engine = engines["llava"]
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=3, stop_token_ids=())
    store = MemoryStore()
    _, request = prefilled_request(engine, store, sampling)
    server = serve(DecodeStep(engine, store), Settings(metrics_port=0, drain_s=0), 0)
    try:
        stub = generator_stub(server)
        chunks = list(stub.Generate(request, timeout=60))
        whole = stub.Complete(request, timeout=60)
        assert list(whole.token_ids) == [t for c in chunks for t in c.token_ids] and len(whole.token_ids) == 39  # the prefill picked the first
        assert whole.text == "".join(c.text for c in chunks) and whole.done
        assert (whole.pending_token, whole.finish_reason) == (chunks[-1].pending_token, chunks[-1].finish_reason)
        assert whole.kv_handle in stored_handles(store) and chunks[-1].kv_handle in stored_handles(store)
    finally:
        server.stop(grace_s=1)
    slow_store = MemoryStore()
    done, request = prefilled_request(engine, slow_store, sampling)
    server = serve(SlowDecode(engine, slow_store), Settings(metrics_port=0, drain_s=0), 0)
    try:
        with pytest.raises(grpc.RpcError) as late:
            generator_stub(server).Complete(request, timeout=0.2)  # 39 tokens at 20 ms each take 0.8 s
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.0)
        assert stored_handles(slow_store) == {done.kv_handle}
    finally:
        server.stop(grace_s=1)


def test_a_stage_logs_and_counts_a_call_after_its_caller_has_the_answer(engines):
    """The call's log line and metrics are written once its status is sent, not while the caller
    waits: here the caller gets its answer while the log line is held up. A call whose caller
    gave up counts as in flight until its handler stops, and not as answered."""
    import logging
    import threading

    import grpc

    from services.generator.server import serve
    from services.rpc.dartserve.v1 import vision_pb2, vision_pb2_grpc
    from services.vision.server import serve as serve_vision

    class Held(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.released, self.records = threading.Event(), []

        def emit(self, record) -> None:
            self.released.wait(10)
            self.records.append(record)

    class SlowEncode(VisionStep):  # answers, but after its caller's deadline
        def encode(self, *args, **kwargs):
            encoded = super().encode(*args, **kwargs)
            time.sleep(0.3)
            return encoded

    engine = engines["llava"]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=3, stop_token_ids=())
    store = MemoryStore()
    _, request = prefilled_request(engine, store, sampling)
    step = SlowDecode(engine, store)
    settings = Settings(metrics_port=0, drain_s=0)
    servers = [serve(step, settings, 0), serve_vision(SlowEncode(engine, store), settings, 0)]
    held, logger = Held(), logging.getLogger("services.stage_calls")
    level = logger.level
    logger.addHandler(held)
    logger.setLevel(logging.INFO)

    def sample(name, stage="generator", **labels):
        server = servers[stage == "vision"]
        return server.metrics.registry.get_sample_value(name, {"stage": stage, **labels}) or 0

    try:
        stub = generator_stub(servers[0])
        # The old order, log line first, would run past this deadline: the handler holds it 10 s.
        whole = stub.Complete(request, timeout=5, metadata=(("x-request-id", "held-1"),))
        assert len(whole.token_ids) == 5
        held.released.set()
        wait_until(lambda: any(r.fields["request_id"] == "held-1" for r in held.records), "the call's log line", timeout_s=5)
        fields = next(r.fields for r in held.records if r.fields["request_id"] == "held-1")
        assert (fields["method"], fields["code"]) == ("Complete", "OK")
        wait_until(lambda: sample("dartserve_stage_calls_total", method="Complete", code="OK") == 1, "the call to be counted", timeout_s=5)
        step.pause_s = 0.3  # the next call's handler outlasts its caller
        with pytest.raises(grpc.RpcError) as late:
            stub.Complete(request, timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert sample("dartserve_stage_in_flight") == 1  # its caller left; its handler has not
        wait_until(lambda: sample("dartserve_stage_in_flight") == 0, "the late call to end", timeout_s=5)
        assert sample("dartserve_stage_calls_total", method="Complete", code="DEADLINE_EXCEEDED") == 1
        encode = vision_pb2_grpc.VisionServiceStub(grpc.insecure_channel(f"127.0.0.1:{servers[1].port}")).Encode
        with pytest.raises(grpc.RpcError) as late:
            encode(vision_pb2.EncodeRequest(images=[png(make_image(42))], conversation=[vision_pb2.Turn(role="user", content=PROMPT)]), timeout=0.1)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The handler returned an answer after its caller had gone: not counted as answered.
        wait_until(lambda: sample("dartserve_stage_in_flight", "vision") == 0, "the late encode to end", timeout_s=5)
        assert sample("dartserve_stage_calls_total", "vision", method="Encode", code="DEADLINE_EXCEEDED") == 1
        assert sample("dartserve_stage_calls_total", "vision", method="Encode", code="OK") == 0
    finally:
        held.released.set()
        logger.removeHandler(held)
        logger.setLevel(level)
        for server in servers:
            server.stop(grace_s=1)


def test_calls_whose_caller_gave_up_while_waiting_for_the_model_are_not_worked_on(engines):
    """A call queued behind other work of the engine's loop, whose deadline passes in the queue,
    does no work once the loop comes to it: nothing is encoded, prefilled or stored for it."""
    import threading

    import grpc

    from dartserve.engine import Engine
    from dartserve.engine.core import EngineCore
    from dartserve.engine.loop import EngineLoop
    from services.convert import pruning_to_proto, sampling_to_proto
    from services.pruner.server import serve as serve_pruner
    from services.rpc.dartserve.v1 import pruner_pb2, pruner_pb2_grpc, vision_pb2, vision_pb2_grpc
    from services.vision.server import serve as serve_vision

    adapter, gate, towers = engines["llava"].adapter, threading.Event(), []

    def tower(images):  # the loop's thread waits here while the gate is shut
        towers.append(len(images))
        gate.wait(10)
        return adapter.image_features_many(images)

    engine = Engine(adapter)
    engine._loop = EngineLoop(EngineCore(adapter), tower)
    store = MemoryStore()
    settings = Settings(metrics_port=0, drain_s=0)
    vision, prefill = VisionStep(engine, store), PrefillStep(engine, store)
    gate.set()
    prompt_ref = vision.encode([png(make_image(40))], PROMPT).prompt_ref
    servers = [serve_vision(vision, settings, 0), serve_pruner(prefill, settings, 0)]
    try:
        encode = vision_pb2_grpc.VisionServiceStub(grpc.insecure_channel(f"127.0.0.1:{servers[0].port}")).Encode
        prefill_call = pruner_pb2_grpc.PrunerServiceStub(grpc.insecure_channel(f"127.0.0.1:{servers[1].port}")).Prefill
        calls = [
            lambda: encode(vision_pb2.EncodeRequest(images=[png(make_image(41))], conversation=[vision_pb2.Turn(role="user", content=PROMPT)]), timeout=0.5),
            lambda: prefill_call(pruner_pb2.PrefillRequest(prompt_ref=prompt_ref, pruning=pruning_to_proto(PruningConfig(budget=12)), sampling=sampling_to_proto(SamplingConfig())), timeout=0.5),
        ]
        for call in calls:
            before, encoded = set(store._values), len(towers)
            gate.clear()
            busy = threading.Thread(target=engine.loop.encode_images, args=([adapter.image_inputs(adapter.processor(text=["x <image>"], images=[make_image(43)], return_tensors="pt"), 0)],))
            busy.start()  # another request's work holds the loop
            with pytest.raises(grpc.RpcError) as late:
                call()
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            gate.set()  # the loop comes to the queued call, and gives it up
            busy.join()
            time.sleep(0.3)
            assert set(store._values) == before and len(towers) == encoded + 1  # only the other work ran
    finally:
        gate.set()
        for server in servers:
            server.stop(grace_s=1)
        engine.loop.stop()


def test_turns_store_only_their_tails_and_equal_from_scratch_runs():
    from dartserve.demo import CHECKPOINT
    from dartserve.demo.data import example
    from dartserve.engine import Engine

    engine = Engine.load(str(CHECKPOINT))
    backend, store = steps(engine)
    item = example("test", 21)
    questions = [item.question, "how many objects are there ?", "is there a red circle ?"]
    none, sampling = PruningConfig(method="none"), SamplingConfig(max_new_tokens=8)
    messages, record = [], None
    for question in questions:
        messages = (record["messages"] if record else []) + [{"role": "user", "content": question}]
        before = set(store._values)
        final = [e for e in backend.answer(Question([png(item.image)] if record is None else [], messages, none, sampling), record) if isinstance(e, Final)][0]
        scratch = engine.generate([item.image], messages, none, sampling)
        assert final.text == scratch.text and final.usage["prompt_tokens"] == scratch.stats.prompt_tokens
        if record is not None:  # a follow-up writes a tail of a few tokens, not the conversation again
            written = [store._values[k][1] for k in set(store._values) - before]
            assert sum(map(len, written)) < scratch.stats.kv_bytes / 20
        record = final.record


def test_chat_follow_up_whose_cache_expired_is_recomputed(demo_client):
    from dartserve.demo.data import example

    item = example("test", 6)
    url = "data:image/png;base64," + base64.b64encode(png(item.image)).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": item.question}]}]
    body = {"model": "dartserve-demo", "temperature": 0, "pruning": {"method": "none"}}
    first = demo_client.post("/v1/chat/completions", json=body | {"messages": messages}).json()
    messages += [first["choices"][0]["message"], {"role": "user", "content": "how many objects are there ?"}]
    cached = demo_client.post("/v1/chat/completions", json=body | {"messages": messages}).json()
    kv = demo_client.app.state.gateway.backend.engine.loop.core.kv
    while kv.evict_one():  # the blocks kept for the conversation released, as a full pool does
        pass
    recomputed = demo_client.post("/v1/chat/completions", json=body | {"messages": messages})
    assert recomputed.status_code == 200
    assert recomputed.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert recomputed.json()["choices"][0]["message"] == cached["choices"][0]["message"]


def test_api_keys_guard_the_gateway_but_not_its_open_paths(tmp_path):
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.launch import embedded_gateway

    (tmp_path / "keys").write_text("second-key\n\n")
    settings = Settings.from_env({"DARTSERVE_API_KEYS": "first-key", "DARTSERVE_API_KEYS_FILE": str(tmp_path / "keys"), "DARTSERVE_OPEN_PATHS": "/healthz"})
    assert settings.api_keys == ("first-key", "second-key") and "first-key" not in repr(settings) and "second-key" not in repr(settings)
    client = TestClient(create_app(embedded_gateway(settings)))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "first-key"}, {"Authorization": "Basic first-key"}):
        reply = client.get("/v1/models", headers=headers)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert reply.json()["error"]["type"] == "authentication_error"
    for key in ("first-key", "second-key"):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 401  # open only when listed
    with pytest.raises(ValueError, match="cannot read"):
        Settings.from_env({"DARTSERVE_API_KEYS_FILE": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="placeholder"):  # the one in k8s/base/api-keys.txt
        Settings.from_env({"DARTSERVE_API_KEYS_FILE": "k8s/base/api-keys.txt"})


class SlowDecode(DecodeStep):
    """A real decode that takes its time over each chunk, so that a call stays in flight."""

    pause_s = 0.02

    def generate(self, *args, **kwargs):
        for chunk in super().generate(*args, **kwargs):
            time.sleep(self.pause_s)
            yield chunk


def held_stream(engines, **settings):
    """A generator service (slow decode) and a long answer it has started streaming."""
    import grpc

    from services.generator.server import serve
    from services.rpc.dartserve.v1 import generator_pb2_grpc

    engine = engines["llava"]
    store = MemoryStore()
    sampling = SamplingConfig(max_new_tokens=300, temperature=1.0, seed=1)
    done, request = prefilled_request(engine, store, sampling)
    expected = [t for chunk in DecodeStep(engine, store).generate(done.kv_handle, sampling, done.first_token) for t in chunk.token_ids]
    server = serve(SlowDecode(engine, store), Settings(metrics_port=0, **settings), 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = generator_pb2_grpc.GeneratorServiceStub(channel)
    stream = stub.Generate(request, timeout=60)
    first = next(stream)
    return server, channel, stub, request, stream, first, expected


def test_a_stage_at_its_limit_refuses_at_once(engines):
    """Admission control: a stage serves DARTSERVE_WORKERS calls, queues DARTSERVE_MAX_QUEUE
    more and refuses the rest, which the gateway's backend reports as Overloaded (429)."""
    from services.frontend.backends import GrpcBackend
    from services.frontend.errors import Overloaded

    server, _, _, request, holding, _, expected = held_stream(engines, workers=1, max_queue=0, drain_s=0)
    try:
        assert len(expected) > 20  # the held call lasts
        backend = GrpcBackend(Settings(generator_addr=f"127.0.0.1:{server.port}", rpc_timeout_s=5))
        with pytest.raises(Overloaded):
            next(backend.generate(request.kv_handle, SamplingConfig(max_new_tokens=4), request.pending_token))
        assert backend.readiness()["generator"] is True  # busy, not down: the gateway stays in service
        # What the autoscaler reads: the call being served, not the refused one nor health checks.
        in_flight = lambda: server.metrics.registry.get_sample_value("dartserve_stage_in_flight", {"stage": "generator"})  # noqa: E731
        assert in_flight() == 1
        holding.cancel()
        wait_until(lambda: in_flight() == 0, "the cancelled call to end", timeout_s=10)
    finally:
        server.stop(grace_s=1)


def test_a_stage_told_to_stop_says_not_serving_then_refuses_new_calls_and_finishes_its_own(engines):
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, channel, stub, request, in_flight, first, expected = held_stream(engines, drain_s=1.0)
    health = health_pb2_grpc.HealthStub(channel)
    stopping = threading.Thread(target=server.stop, kwargs={"grace_s": 30})
    stopping.start()
    try:
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING", timeout_s=5)
        time.sleep(1.2)  # past the drain: new calls are refused
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.Generate(request, timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        chunks = [first, *in_flight]
        assert chunks[-1].done and [t for c in chunks for t in c.token_ids] == expected  # every token, as undisturbed
    finally:
        stopping.join(timeout=60)


def _certificates(folder):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name, issuer_name, issuer_key, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return key

    import ipaddress

    ca_key = issue("ca", "ca", None, ca=True)
    issue("server", "ca", ca_key, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    issue("client", "ca", ca_key)
    other_key = issue("other-ca", "other-ca", None, ca=True)
    issue("stranger", "other-ca", other_key)
    return {name: str(folder / f"{name}.pem") for name in ("ca", "server", "client", "stranger")} | {
        f"{name}_key": str(folder / f"{name}.key") for name in ("server", "client", "stranger")
    }


def test_stages_serve_tls_and_mutual_tls_by_configuration(engines, tmp_path):
    from services.frontend.backends import GrpcBackend
    from services.frontend.errors import Unavailable
    from services.probe import probe
    from services.vision.server import serve

    pem = _certificates(tmp_path)
    engine = engines["llava"]
    server_tls = {"tls_cert": pem["server"], "tls_key": pem["server_key"], "tls_client_ca": pem["ca"]}
    server = serve(VisionStep(engine, MemoryStore()), Settings(metrics_port=0, drain_s=0, **server_tls), 0)
    address = f"127.0.0.1:{server.port}"
    conversation = [{"role": "user", "content": PROMPT}]
    try:
        trusted = GrpcBackend(Settings(vision_addr=address, tls_ca=pem["ca"], tls_client_cert=pem["client"], tls_client_key=pem["client_key"], rpc_timeout_s=5))
        assert trusted.encode([png(make_image(4))], conversation).vision_tokens > 0
        strangers = [
            Settings(vision_addr=address, rpc_timeout_s=5),  # plaintext
            Settings(vision_addr=address, tls_ca=pem["ca"], rpc_timeout_s=5),  # no client certificate
            Settings(vision_addr=address, tls_ca=pem["ca"], tls_client_cert=pem["stranger"], tls_client_key=pem["stranger_key"], rpc_timeout_s=5),
        ]
        for settings in strangers:
            with pytest.raises(Unavailable):
                GrpcBackend(settings).encode([png(make_image(4))], conversation)
        # `dartserve probe` (the container health check) needs the client's TLS settings too.
        client_tls = {"tls_ca": pem["ca"], "tls_client_cert": pem["client"], "tls_client_key": pem["client_key"]}
        assert probe("vision", Settings(port=server.port, **client_tls)) is True
        assert probe("vision", Settings(port=server.port)) is False
    finally:
        server.stop(grace_s=1)
    with pytest.raises(ValueError, match="go together"):
        serve(VisionStep(engine, MemoryStore()), Settings(metrics_port=0, tls_cert=pem["server"]), 0)


def test_image_urls_are_fetched_only_from_allowed_hosts(tmp_path, monkeypatch):
    import http.server
    import threading

    from fastapi.testclient import TestClient

    from dartserve.demo.data import example
    from services.gateway.app import create_app
    from services.frontend.image_urls import ImageUrls
    from services.launch import embedded_gateway

    item = example("test", 5)
    (tmp_path / "picture.png").write_bytes(png(item.image))
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + b"0" * (2 << 20))

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self):
            if self.path == "/slow.png":  # a byte at a time: each read is quick, the whole is not
                self.send_response(200)
                self.end_headers()
                for _ in range(40):
                    self.wfile.write(b"0")
                    self.wfile.flush()
                    time.sleep(0.1)
                return
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_port}"
    monkeypatch.setattr("services.frontend.image_urls.TIMEOUT_S", 1.0)
    try:
        client = TestClient(create_app(embedded_gateway(Settings(image_url_hosts=("127.0.0.1",), max_message_mb=1))))
        by_url = client.post("/v1/answer", json={"image": f"{base}/picture.png", "question": item.question})
        inline = client.post("/v1/answer", json={"image": base64.b64encode(png(item.image)).decode(), "question": item.question})
        assert by_url.status_code == 200 and by_url.json()["answer"] == inline.json()["answer"]
        chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{base}/picture.png"}}, {"type": "text", "text": item.question}]}]
        assert client.post("/v1/chat/completions", json={"model": "dartserve-demo", "messages": chat}).status_code == 200
        for url, says in [
            (f"http://localhost:{files.server_port}/picture.png", "not fetched"),  # a host not on the list
            (f"{base}/moved", "HTTP 302"),  # redirects are not followed
            (f"{base}/missing.png", "HTTP 404"),
            (f"{base}/big.png", "over"),
            ("http://127.0.0.1:1/picture.png", "could not be fetched"),
            (f"{base}/slow.png", "took over 1 s"),
        ]:
            reply = client.post("/v1/answer", json={"image": url, "question": "x"})
            assert reply.status_code == 400 and says in reply.json()["error"]["message"], (url, reply.text)
        closed = TestClient(create_app(embedded_gateway(Settings())))
        assert closed.post("/v1/answer", json={"image": f"{base}/picture.png", "question": "x"}).status_code == 400
    finally:
        files.shutdown()
    wildcard = ImageUrls(("*.example.com", "Images.Test"), 1 << 20)
    assert [wildcard.allowed(h) for h in ("a.example.com", "a.b.EXAMPLE.com", "images.test")] == [True, True, True]
    assert [wildcard.allowed(h) for h in ("example.com", "badexample.com", "example.com.evil", "x.images.test")] == [False] * 4


def test_embedded_mode_without_redis_answers_batches_with_503():
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.launch import embedded_gateway

    client = TestClient(create_app(embedded_gateway(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))))
    image = base64.b64encode(png(make_image(1))).decode()
    reply = client.post("/v1/batches", json={"requests": [{"custom_id": "a", "image": image, "question": "how many objects are there ?"}]})
    assert reply.status_code == 503 and reply.headers["retry-after"] and reply.json()["error"]["type"] == "service_unavailable"
    assert client.get("/v1/batches/batch_x").status_code == 503
    assert client.get("/healthz").status_code == 200  # answering questions needs no Redis
