"""The floor of the distributed design on the machine the bench runs on: three bare gRPC
servers in their own processes, each waiting as long as its stage works, the first storing
the image tokens' bytes in Redis (the claim check) and the second reading them, against the
same waits in one process.

It is what three calls in turn and the claim check cost before any of dartserve's code runs:
what the distributed mode adds beyond it is roughly dartserve's own (the floor runs in a phase
of its own, after the services). The waits are sleeps: the servers are idle when a call
reaches them, as the stages are between one request and the next.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from concurrent import futures

METHOD = "/dartserve.bench.Floor/Call"
STORE, LOAD = b"store", b"load:"


def serve(redis_url: str, work_s: float, token_bytes: int) -> None:
    """A stage with no model, on a free port it prints: ``store`` writes ``token_bytes`` to
    Redis and replies with what the next stage loads; ``load:KEY`` reads that value first."""
    import grpc

    from dartserve.kv.store import redis_client

    client = redis_client(redis_url)
    tokens = os.urandom(token_bytes)

    def call(request: bytes, context) -> bytes:
        if request.startswith(LOAD) and client.get(request[len(LOAD) :]) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "the claim check is not in Redis")
        time.sleep(work_s)
        if request != STORE:
            return b""
        key = f"dartserve:bench:floor:{uuid.uuid4().hex}"
        client.set(key, tokens, ex=60)
        return LOAD + key.encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service, method = METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(call)}),))
    port = server.add_insecure_port("127.0.0.1:0")  # no port chosen by the parent that another may take first
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def measure_floor(redis_url: str, work_ms: dict[str, float], token_bytes: int, rounds: int = 100, warmup: int = 10) -> dict:
    """``work_ms``: the vision, pruner and generator stages' own work, in call order. Each round
    takes the waits in this process, then the three calls, then the calls with the claim check;
    the figures are medians over rounds of what the calls added to the waits in the same round."""
    import subprocess

    import grpc

    from services.processes import stop

    processes, channels = [], []
    try:
        for ms in work_ms.values():
            command = [sys.executable, "-m", "services.bench_floor", redis_url, str(ms / 1e3), str(token_bytes)]
            processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
        for process in processes:
            port = process.stdout.readline().strip()
            if not port:
                raise RuntimeError(f"a floor stage exited with {process.wait()} before it served")
            channels.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=60)
        calls = [channel.unary_unary(METHOD) for channel in channels]

        def in_turn(first: bytes) -> None:
            reply = first
            for call in calls:
                reply = call(reply, timeout=30)

        def in_process() -> None:
            for ms in work_ms.values():  # in turn, as the calls wait: each sleep overshoots alike
                time.sleep(ms / 1e3)

        regimes = {
            "in_process": in_process,
            "calls": lambda: in_turn(b""),
            "calls_and_claim_check": lambda: in_turn(STORE),
        }
        times = {name: [] for name in regimes}
        for index in range(warmup + rounds):
            for name, run in regimes.items():
                started = time.perf_counter()
                run()
                if index >= warmup:
                    times[name].append((time.perf_counter() - started) * 1e3)
    finally:
        for channel in channels:
            channel.close()
        stop(processes)
        for process in processes:
            process.stdout.close()
    baseline = times["in_process"]
    return {
        "work_ms": work_ms,
        "token_bytes": token_bytes,
        "rounds": rounds,
        **{f"{name}_added_p50_ms": statistics.median(t - b for t, b in zip(times[name], baseline)) for name in ("calls", "calls_and_claim_check")},
    }


if __name__ == "__main__":
    redis_url, work_s, token_bytes = sys.argv[1:]
    serve(redis_url, float(work_s), int(token_bytes))
