"""Distributed mode for real: the three gRPC services and the gateway as separate processes on
loopback, with a private redis-server, checked against the in-process engine (greedy)."""


import json
import os
import platform
import time

import grpc
import httpx
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from openai import OpenAI

from dartserve.demo import CHECKPOINT
from dartserve.engine import Engine
from dartserve.models.decode import SamplingConfig
from dartserve.pruning import PruningConfig
from cluster import STAGES, b64, png, pruner_down, running_cluster
from processes import dartserve_process, free_port, stop, wait_until
from services.bench import minor_faults
from services.rpc.dartserve.v1 import vision_pb2, vision_pb2_grpc

SAMPLING = SamplingConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory):
    with running_cluster(redis_server.url, tmp_path_factory.mktemp("logs")) as running:
        yield running


@pytest.fixture(scope="module")
def demo_engine():
    return Engine.load(str(CHECKPOINT))


@pytest.mark.parametrize("pruning", [{"method": "dart", "budget": 64}, {"method": "none"}, {"method": "fastv", "ratio": 0.25}])
def test_rest_answers_equal_the_in_process_engine(cluster, demo_engine, redis_server, pruning):
    from dartserve.kv.store import MemoryStore, RedisStore
    from dartserve.stages import DecodeStep, PrefillStep, VisionStep
    from services.gateway import conversations as conv
    from stages_in_process import StagesInProcess
    from services.frontend.pipeline import Final, Question

    redis_store = RedisStore(redis.Redis.from_url(redis_server.url))
    memory = MemoryStore()
    in_process = StagesInProcess(VisionStep(demo_engine, memory), PrefillStep(demo_engine, memory), DecodeStep(demo_engine, memory))
    for index in range(4):
        data, item = png(index)
        reply = httpx.post(f"{cluster['url']}/v1/answer", json={"image": b64(data), "question": item.question, "pruning": pruning, "max_new_tokens": 8}, timeout=60)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        expected = demo_engine.generate([item.image], item.question, PruningConfig(**pruning), SAMPLING)
        assert body["answer"] == expected.text
        assert body["usage"]["completion_tokens"] == len(expected.token_ids)
        assert body["usage"]["kept_vision_tokens"] == expected.stats.vision_tokens_kept
        assert body["usage"]["vision_tokens"] == 576
        assert body["pruning"] == PruningConfig(**pruning).applied(576)
        # The answers are a word or two: the KV cache the stages left in Redis is checked too,
        # against the same answer's cache left in memory by the stages run in this process.
        record = conv.Conversations(redis_store, 60, None).get(conv.by_id("", body["conversation_id"]))
        question = Question([data], [{"role": "user", "content": item.question}], PruningConfig(**pruning), SAMPLING)
        final = next(e for e in in_process.answer(question, stream=False) if isinstance(e, Final))
        stored, _ = DecodeStep(demo_engine, redis_store)._load(record["kv_handle"])
        want, _ = DecodeStep(demo_engine, memory)._load(final.record["kv_handle"])
        assert [t.tolist() for t in stored.token_index] == [t.tolist() for t in want.token_index]
        for got, ref in zip(stored.keys + stored.values, want.keys + want.values):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_default_pruning_is_dart_at_layer_2_keeping_64_of_576(cluster, demo_engine):
    data, item = png(5)
    body = httpx.post(f"{cluster['url']}/v1/answer", json={"image": b64(data), "question": item.question}, timeout=60).json()
    assert body["usage"]["kept_vision_tokens"] == 64
    assert body["pruning"] == {"method": "dart", "budget": 64, "layer": 2, "pivot_image": 4, "pivot_text": 4}
    assert body["answer"] == demo_engine.generate([item.image], item.question, PruningConfig(ratio=64 / 576), SamplingConfig()).text


def test_openai_client_unchanged(cluster, demo_engine):
    client = OpenAI(base_url=f"{cluster['url']}/v1", api_key="not-checked")
    assert [m.id for m in client.models.list().data] == [str(CHECKPOINT)]
    data, item = png(6)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(data)}"}}, {"type": "text", "text": item.question}]}]
    expected = demo_engine.generate([item.image], item.question, PruningConfig(budget=64), SAMPLING)
    completion = client.chat.completions.create(model=str(CHECKPOINT), messages=messages, max_tokens=8, temperature=0, extra_body={"pruning": {"budget": 64}})
    assert completion.choices[0].message.content == expected.text
    assert completion.usage.completion_tokens == len(expected.token_ids)
    stream = client.chat.completions.create(model=str(CHECKPOINT), messages=messages, max_tokens=8, temperature=0, stream=True, extra_body={"pruning": {"budget": 64}})
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices).strip() == expected.text


def test_follow_up_turn_prefills_only_its_own_tokens(cluster, demo_engine):
    data, item = png(7)
    first = httpx.post(f"{cluster['url']}/v1/answer", json={"image": b64(data), "question": item.question, "pruning": {"method": "none"}}, timeout=60).json()
    question = "how many objects are there ?"
    second = httpx.post(f"{cluster['url']}/v1/answer", json={"question": question, "conversation_id": first["conversation_id"]}, timeout=60).json()
    turn1 = demo_engine.generate([item.image], item.question, PruningConfig(method="none"), SamplingConfig())
    assert second["usage"]["prefill_tokens"] == len(demo_engine.adapter.turn_ids(turn1.token_ids[-1], question))
    whole = [{"role": "user", "content": item.question}, {"role": "assistant", "content": turn1.text}, {"role": "user", "content": question}]
    scratch = demo_engine.generate([item.image], whole, PruningConfig(method="none"), SamplingConfig())
    assert second["answer"] == scratch.text
    assert second["usage"]["prompt_tokens"] == scratch.stats.prompt_tokens


def test_every_key_the_services_write_expires(cluster, redis_server):
    data, item = png(8)
    first = httpx.post(f"{cluster['url']}/v1/answer", json={"image": b64(data), "question": item.question, "conversation_id": "ttl-check"}, timeout=60)
    assert first.status_code == 200
    assert httpx.post(f"{cluster['url']}/v1/answer", json={"question": "how many objects are there ?", "conversation_id": "ttl-check"}, timeout=60).status_code == 200
    client = redis.Redis.from_url(redis_server.url)
    keys = [key.decode() for key in client.scan_iter(count=1000)]
    # Prompts, image tokens, KV layers and manifests (a prefill's and a turn's tail), conversations.
    assert {key.split(":")[1] for key in keys} >= {"prompt", "vision", "kv", "conversation"}
    assert [key for key in keys if client.ttl(key) <= 0] == []


def test_chat_history_continues_from_the_cached_conversation(cluster, demo_engine):
    client = OpenAI(base_url=f"{cluster['url']}/v1", api_key="not-checked")
    data, item = png(8)
    image_part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(data)}"}}
    messages = [{"role": "user", "content": [image_part, {"type": "text", "text": item.question}]}]
    pruning = {"extra_body": {"pruning": {"method": "none"}}, "temperature": 0, "model": str(CHECKPOINT)}
    first = client.chat.completions.create(messages=messages, **pruning)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "how many objects are there ?"}]
    second = client.chat.completions.create(messages=messages, **pruning)
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens - 1
    whole = [{"role": "user", "content": item.question}, {"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "how many objects are there ?"}]
    assert second.choices[0].message.content == demo_engine.generate([item.image], whole, PruningConfig(method="none")).text


def test_services_report_health_and_reflection(cluster):
    for name in STAGES:
        channel = grpc.insecure_channel(f"127.0.0.1:{cluster['ports'][name]}")
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        services = {s.name for s in reply.list_services_response.service}
        assert {"grpc.health.v1.Health", f"dartserve.v1.{name.capitalize()}Service"} <= services


@pytest.mark.skipif(not os.path.exists("/proc/self/stat") or platform.libc_ver()[0] != "glibc", reason="glibc on Linux only")
def test_the_pruner_serves_requests_from_memory_it_freed_not_from_fresh_pages(cluster):
    # With glibc's defaults the pruner took about 1,070 page faults per answer here.
    data, item = png(3)
    body = {"image": b64(data), "question": item.question, "max_new_tokens": 2}
    for _ in range(2):  # the first answers grow the heap to what an answer needs
        httpx.post(f"{cluster['url']}/v1/answer", json=body, timeout=60).raise_for_status()
    pid = cluster["processes"]["pruner"].pid
    before = minor_faults(pid)
    for _ in range(8):
        httpx.post(f"{cluster['url']}/v1/answer", json=body, timeout=60).raise_for_status()
    assert (minor_faults(pid) - before) / 8 < 200


def test_vision_returns_a_claim_check_and_never_encodes_an_image_twice(cluster):
    stub = vision_pb2_grpc.VisionServiceStub(grpc.insecure_channel(f"127.0.0.1:{cluster['ports']['vision']}"))
    data, item = png(9)
    turn = [vision_pb2.Turn(role="user", content=item.question)]
    first = stub.Encode(vision_pb2.EncodeRequest(images=[data], conversation=turn), timeout=30)
    again = stub.Encode(vision_pb2.EncodeRequest(images=[data], conversation=[vision_pb2.Turn(role="user", content="how many objects are there ?")]), timeout=30)
    assert first.prompt_ref.startswith("dartserve:prompt:") and first.vision_tokens == 576 and first.prompt_tokens > 576
    assert (first.images_cached, again.images_cached) == (0, 1)
    with pytest.raises(grpc.RpcError) as error:
        stub.Encode(vision_pb2.EncodeRequest(images=[b"not an image"], conversation=turn), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_requests_get_clear_4xx_errors(cluster):
    data, item = png(10)
    cases = [
        ({"image": "%%%", "question": "x"}, 400, "image"),
        ({"image": b64(b"not an image"), "question": "x"}, 400, None),
        ({"image": b64(data), "question": "x", "pruning": {"method": "nope"}}, 400, "pruning"),
        ({"image": b64(data), "question": "x", "pruning": {"layer": 99}}, 400, None),
        ({"image": b64(data), "question": "x", "max_new_tokens": 0}, 400, "max_new_tokens"),
        ({"image": b64(data), "question": ""}, 400, "question"),
        ({"image": b64(data), "question": "x", "surprise": 1}, 400, "surprise"),
        ({"question": "x", "conversation_id": "never-seen"}, 404, "conversation_id"),
    ]
    for body, status, param in cases:
        reply = httpx.post(f"{cluster['url']}/v1/answer", json=body, timeout=60)
        assert reply.status_code == status, (body, reply.text)
        error = reply.json()["error"]
        assert error["message"] and error["type"]
        if param:
            assert error["param"] == param
    assert httpx.post(f"{cluster['url']}/v1/answer", content=b"x", headers={"content-type": "text/plain"}).status_code == 415


def test_redis_down_gives_503_never_a_wrong_answer_and_recovers(cluster, redis_server, demo_engine):
    data, item = png(11)
    body = {"image": b64(data), "question": item.question, "max_new_tokens": 8}
    expected = demo_engine.generate([item.image], item.question, PruningConfig(ratio=64 / 576), SAMPLING).text
    redis_server.stop()
    try:
        reply = httpx.post(f"{cluster['url']}/v1/answer", json=body, timeout=60)
        assert reply.status_code == 503 or reply.json()["answer"] == expected
        if reply.status_code == 503:
            assert reply.json()["error"]["type"] == "service_unavailable" and reply.headers["retry-after"]
        ready = httpx.get(f"{cluster['url']}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["stages"]["store"] is False
    finally:
        redis_server.start()
    reply = httpx.post(f"{cluster['url']}/v1/answer", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["answer"] == expected


def test_metrics_count_requests_tokens_and_cache_hits(cluster):
    from prometheus_client.parser import text_string_to_metric_families

    def sample(name, labels, url=f"{cluster['url']}/metrics"):
        text = httpx.get(url).text
        values = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name and labels.items() <= s.labels.items()]
        return sum(values)

    def stage_url(stage):
        return f"http://127.0.0.1:{cluster['metrics_ports'][stage]}/metrics"

    def stage_calls(stage, method, code="OK"):
        return sample("dartserve_stage_calls_total", {"stage": stage, "method": method, "code": code}, stage_url(stage))

    def stage_in_flight(stage):  # a stage counts a call once its caller has the answer
        return sample("dartserve_stage_in_flight", {"stage": stage}, stage_url(stage))

    counters = [
        ("dartserve_requests_total", {"endpoint": "/v1/answer", "status": "200"}),
        ("dartserve_tokens_total", {"kind": "completion"}),
        ("dartserve_cache_hits_total", {"cache": "vision"}),
        ("dartserve_time_to_first_token_seconds_count", {}),
        ("dartserve_request_latency_seconds_count", {}),
        ("dartserve_kept_vision_token_ratio_count", {}),
    ]
    # An answer the client does not stream is decoded by one Complete call; Generate streams.
    stages = [("vision", "Encode"), ("pruner", "Prefill"), ("generator", "Complete"), ("generator", "Generate")]
    before = [sample(*c) for c in counters] + [stage_calls(*s) for s in stages]
    data, item = png(12)
    answers = [httpx.post(f"{cluster['url']}/v1/answer", json={"image": b64(data), "question": item.question}, timeout=60) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    wait_until(lambda: not any(stage_in_flight(stage) for stage in cluster["metrics_ports"]), "the stages to count their calls", timeout_s=10)
    after = [sample(*c) for c in counters] + [stage_calls(*s) for s in stages]
    requests, tokens, hits, ttft, latency, ratio, encodes, prefills, completes, generates = (a - b for a, b in zip(after, before))
    completion = [a.json()["usage"]["completion_tokens"] for a in answers]
    assert requests == 2 and tokens == sum(completion) and hits == 1 and ttft == latency == ratio == 2
    # The stages' own metrics, which the pruner's and generator's autoscalers read.
    assert encodes == prefills == 2 and completes == sum(n > 1 for n in completion) and generates == 0
    missing = stage_calls("pruner", "Prefill", "NOT_FOUND")
    refused = httpx.post(f"{cluster['url']}/v1/answer", json={"image": b64(b"not an image"), "question": "q"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "image"  # named across gRPC too
    too_long = httpx.post(f"{cluster['url']}/v1/answer", json={"image": b64(data), "question": "q", "max_new_tokens": 5000}, timeout=60)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_new_tokens"
    wait_until(lambda: not any(stage_in_flight(stage) for stage in cluster["metrics_ports"]), "the stages to count their calls", timeout_s=10)
    assert stage_calls("vision", "Encode", "INVALID_ARGUMENT") >= 1 and stage_calls("pruner", "Prefill", "NOT_FOUND") == missing


def test_sse_stream_carries_the_same_answer(cluster, demo_engine):
    data, item = png(13)
    with httpx.stream("POST", f"{cluster['url']}/v1/answer", json={"image": b64(data), "question": item.question, "stream": True}, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    parsed = [json.loads(e) for e in events[:-1]]
    final = parsed[-1]
    assert final["type"] == "answer"
    assert "".join(e["text"] for e in parsed if e["type"] == "delta").strip() == final["answer"]
    assert final["answer"] == demo_engine.generate([item.image], item.question, PruningConfig(ratio=64 / 576)).text


def test_bench_load_reports_answers_errors_and_peak_memory(cluster):
    from services.bench_load import run_load_bench

    stages = {name: f"http://127.0.0.1:{port}/metrics" for name, port in cluster["metrics_ports"].items()}
    result = run_load_bench(url=cluster["url"], requests=12, concurrency=3, metrics={"gateway": f"{cluster['url']}/metrics", **stages})
    assert (result["sent"], result["answered"], result["errors"]) == (12, 12, {})
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p95"] <= result["latency_ms"]["p99"]
    assert set(result["peak_memory_mb"]) == {"gateway", "vision", "pruner", "generator"}
    assert all(mb > 50 for mb in result["peak_memory_mb"].values())  # each holds torch, at least


def test_a_distributed_start_that_fails_stops_the_processes_it_started(monkeypatch, tmp_path):
    import subprocess
    import sys

    import services.processes

    started = []

    def start(command, env, log, args=()):
        if command == "gateway":
            raise OSError("no more processes")
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return started[-1]

    monkeypatch.setattr(services.processes, "start_dartserve", start)
    with pytest.raises(OSError):
        services.processes.start_distributed({}, tmp_path)
    assert len(started) == len(STAGES)
    assert all(process.poll() is not None for process in started)


def test_bench_design_floor_calls_bare_stages_that_hand_the_tokens_on_through_redis(redis_server):
    from services.bench_floor import measure_floor

    client = redis.Redis.from_url(redis_server.url)
    before = set(client.keys("dartserve:bench:floor:*"))
    hits_before = client.info("stats")["keyspace_hits"]
    result = measure_floor(redis_server.url, {"vision": 3.0, "pruner": 2.0, "generator": 1.0}, token_bytes=295_000, rounds=4, warmup=1)
    written = set(client.keys("dartserve:bench:floor:*")) - before
    assert len(written) == 5  # one claim check a round, warm-up included, each read back by the second stage
    assert client.info("stats")["keyspace_hits"] - hits_before >= 5
    assert {client.strlen(key) for key in written} == {295_000} and all(0 < client.ttl(key) <= 60 for key in written)
    # Only a sanity bound: calls between processes cost something beyond the same waits in one.
    assert 0 < result["calls_added_p50_ms"] < 1000 and 0 < result["calls_and_claim_check_added_p50_ms"] < 1000
    assert result["rounds"] == 4 and result["token_bytes"] == 295_000


def test_a_request_id_is_echoed_and_reaches_every_stage_log_as_json(cluster):
    import json

    data, item = png(14)
    body = {"image": b64(data), "question": item.question}
    reply = httpx.post(f"{cluster['url']}/v1/answer", json=body, headers={"X-Request-Id": "trace-42", "Authorization": "Bearer sk-do-not-log"}, timeout=60)
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "trace-42"
    made = httpx.post(f"{cluster['url']}/v1/answer", json=body, headers={"X-Request-Id": "bad id\twith spaces"}, timeout=60)
    assert made.headers["x-request-id"] != "bad id\twith spaces" and len(made.headers["x-request-id"]) == 32
    def logged(name):
        lines = [json.loads(line) for line in (cluster["logs"] / f"{name}.log").read_text().splitlines() if line]  # every line is JSON
        return any(line["request_id"] == "trace-42" and line["service"] == name for line in lines)

    for name in ("gateway", "vision", "pruner", "generator"):
        wait_until(lambda: logged(name), f"the {name}'s log line", timeout_s=10)  # a stage logs a call once it has answered
        assert "sk-do-not-log" not in (cluster["logs"] / f"{name}.log").read_text()


def test_a_stage_down_gives_503_within_the_timeout_and_recovers_by_itself(cluster, tmp_path):
    data, item = png(15)
    body = {"image": b64(data), "question": item.question, "max_new_tokens": 4}
    expected = httpx.post(f"{cluster['url']}/v1/answer", json=body, timeout=60).json()["answer"]
    with pruner_down(cluster, tmp_path / "pruner.log"):
        started = time.monotonic()
        reply = httpx.post(f"{cluster['url']}/v1/answer", json=body, timeout=120)
        assert reply.status_code == 503 and reply.headers["retry-after"] and reply.json()["error"]["type"] == "service_unavailable"
        # A refused connection fails the call at once: the gateway does not sit out its 60 s deadline.
        assert time.monotonic() - started < 20
        ready = httpx.get(f"{cluster['url']}/readyz")
        assert ready.status_code == 503 and ready.json()["stages"]["pruner"] is False
    wait_until(lambda: httpx.get(f"{cluster['url']}/readyz").status_code == 200, "the gateway ready again", timeout_s=120)
    assert httpx.post(f"{cluster['url']}/v1/answer", json=body, timeout=60).json()["answer"] == expected


def test_a_stage_has_its_clients_reconnect_after_the_connection_age_without_failing_a_call():
    """Clients reconnect (and so find replicas added since); a call in flight when its
    connection reaches that age still finishes on it."""
    from services.config import Settings
    from services.grpc_server import Server

    def peer(request, context):
        time.sleep(float(request))
        return context.peer().encode()

    def register(server):
        handler = grpc.unary_unary_rpc_method_handler(peer)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Peer", {"Who": handler})])

    server = Server("vision", "test.Peer", register, Settings(connection_age_s=1.0, metrics_port=0, drain_s=0), 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        who = channel.unary_unary("/test.Peer/Who")
        first = who(b"0", timeout=10)
        in_flight = who.future(b"2.5", timeout=10)
        peers = []
        for _ in range(20):
            peers.append(who(b"0", timeout=10))
            time.sleep(0.2)
        assert in_flight.result() == first
        assert peers[0] == first and len(set(peers)) >= 2
    finally:
        channel.close()
        server.stop(grace_s=0)


def test_a_gateway_told_to_stop_finishes_its_streams_and_takes_no_new_requests(checkpoints, tmp_path):
    """SIGTERM: the open stream runs to its end; the listener is closed to new requests."""
    import signal

    port = free_port()
    env = {"DARTSERVE_MODEL": str(checkpoints["llava"]), "DARTSERVE_PORT": str(port)}
    serve = dartserve_process("serve", env, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, "serve", serve, tmp_path / "serve.log")
        image = b64(png(3)[0])
        body = {"image": image, "question": "describe", "max_new_tokens": 300, "temperature": 1.0, "seed": 3}
        whole = httpx.post(f"{url}/v1/answer", json=body, timeout=120).json()  # the same answer, undisturbed
        with httpx.stream("POST", f"{url}/v1/answer", json=body | {"stream": True}, timeout=120) as stream:
            events = stream.iter_lines()
            assert next(e for e in events if e.startswith("data:"))
            serve.send_signal(signal.SIGTERM)
            wait_until(lambda: refused(f"{url}/healthz"), "the listener to close", timeout_s=30)
            rest = [e for e in events if e.startswith("data:")]
        answer = json.loads(rest[-2].removeprefix("data: "))
        assert rest[-1] == "data: [DONE]" and answer["type"] == "answer"
        assert answer["answer"] == whole["answer"] and answer["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"] > 20
        # uvicorn shuts down cleanly, then ends by the signal it caught.
        assert serve.wait(timeout=30) in (0, -signal.SIGTERM) and "Finished server process" in (tmp_path / "serve.log").read_text()
    finally:
        stop([serve])


def refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.TransportError:
        return True
    return False


def test_a_gateway_at_its_limit_answers_429_with_retry_after(tmp_path):
    import asyncio

    port = free_port()
    serve = dartserve_process("serve", {"DARTSERVE_PORT": str(port), "DARTSERVE_MAX_REQUESTS": "1"}, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    data, item = png(16)
    body = {"image": b64(data), "question": item.question, "max_new_tokens": 8}

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/answer", json=body) for _ in range(8)))

    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, "serve", serve, tmp_path / "serve.log")
        replies = asyncio.run(burst())
        statuses = sorted(r.status_code for r in replies)
        assert set(statuses) == {200, 429}, statuses  # one at a time is answered, the rest told to come back
        refused = next(r for r in replies if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_exceeded"
        assert httpx.post(f"{url}/v1/answer", json=body, timeout=60).status_code == 200  # the slot came back
    finally:
        stop([serve])
