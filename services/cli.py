"""The ``dartserve`` command line: the library's commands (ask, generate, eval, train-demo, the
engine's benchmarks) and the services' (serve, the stages, gateway, worker, batch, probe)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from dartserve.demo import default_model
from services.allocator import keep_freed_memory

# torch is imported where a command needs it: `dartserve probe` and `batch` start in a blink.
DTYPE_NAMES = ("bfloat16", "float16", "float32")


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _bench_prefill(args: argparse.Namespace) -> int:
    from dartserve.bench import run_prefill_bench

    rows = run_prefill_bench(
        width=args.width,
        depth=args.depth,
        layer=args.layer,
        budgets=args.budgets,
        methods=tuple(args.methods.split(",")),
        runs=args.runs,
        device=args.device,
        dtype=_dtype(args.dtype),
    )
    header = f"{'method':<12} {'budget':>6} {'prefill ms':>11} {'speedup':>8} {'ideal':>6} {'% ideal':>8} {'select %':>9} {'KV MiB':>8}"
    return _report(rows, args.json, header, lambda row: (
        f"{row['method']:<12} {row['budget']:>6} {row['prefill_ms']:>11.1f} {row['speedup']:>8.2f} "
        f"{row['ideal_speedup']:>6.2f} {100 * row['speedup_of_ideal']:>7.1f}% {100 * row['selection_share']:>8.3f}% "
        f"{row['kv_bytes'] / 2**20:>8.2f}"
    ), machine=True)


def _bench_engine(args: argparse.Namespace) -> int:
    import torch

    from dartserve.bench_engine import run_engine_bench
    from dartserve.engine.core import CoreConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    given = {"kv_cache_mb": args.kv_cache_mb, "max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs}
    config = CoreConfig(**{name: value for name, value in given.items() if value is not None})
    rows = run_engine_bench(
        workloads=tuple(args.workloads.split(",")),
        concurrencies=args.concurrency,
        runs=args.runs,
        requests=args.requests,
        width=args.width,
        depth=args.depth,
        device=args.device,
        dtype=_dtype(args.dtype),
        config=config,
        pool_requests=args.pool_requests,
    )
    header = f"{'workload':<8} {'conc':>4} {'req/s':>7} {'tok/s':>8} {'x c=1':>6} {'TTFT p50':>9} {'ITL p50':>8} {'ITL p95':>8} {'batch':>6} {'exact':>6} {'roofline':>9}"
    return _report(rows, args.json, header, lambda row: (
        f"{row['workload']:<8} {row['concurrency']:>4} {row['request_throughput']:>7.2f} {row['output_throughput']:>8.1f} "
        f"{row.get('output_throughput_vs_concurrency_1', 0):>6.2f} {row['ttft_p50_ms']:>9.1f} {row['itl_p50_ms']:>8.1f} "
        f"{row['itl_p95_ms']:>8.1f} {row['mean_decode_batch']:>6.2f} {str(row['exact']):>6} {row.get('roofline_output_throughput', '-'):>9}"
    ), machine=True)


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from dartserve.engine import Engine
    from dartserve.models import SamplingConfig
    from dartserve.models.loading import quiet_loading
    from dartserve.defaults import DEFAULT_PRUNING
    from services.convert import merge_pruning

    # The server's default pruning for what the flags leave out, as a request's pruning gets it.
    given = {"method": args.method, "budget": args.budget, "ratio": args.ratio, "layer": args.layer}
    pruning = merge_pruning({name: value for name, value in given.items() if value is not None}, DEFAULT_PRUNING)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        images = [Image.open(path).convert("RGB") for path in args.image]  # read whole: a damaged file fails here
    except OSError as error:  # missing, unreadable or not an image
        raise ValueError(f"cannot read image: {error}") from None
    with quiet_loading():
        engine = Engine.load(args.model, device=args.device, dtype=_dtype(args.dtype))
    result = engine.generate(images, args.prompt, pruning=pruning, sampling=sampling)
    print(result.text)
    if args.stats:
        print(json.dumps(rest_stats(result.stats, pruning)), file=sys.stderr)
    return 0


def rest_stats(stats, pruning) -> dict:
    """A one-shot answer's figures under the names /v1/answer gives them."""
    usage = {
        "prompt_tokens": stats.prompt_tokens,
        "vision_tokens": stats.vision_tokens,
        "kept_vision_tokens": stats.vision_tokens_kept,
        "completion_tokens": stats.new_tokens,
        "prefill_tokens": stats.prompt_tokens,
        "kv_bytes": stats.kv_bytes,
    }
    timings = {"encode_ms": stats.vision_ms, "prefill_ms": stats.prefill_ms, "selection_ms": stats.selection_ms, "decode_ms": stats.decode_ms}
    return {"usage": usage, "timings": {name: round(ms, 3) for name, ms in timings.items()}, "pruning": pruning.applied(stats.vision_tokens)}


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dartserve.engine import Engine
    from dartserve.evaluation import evaluate, jsonl_items, settings_grid, synthetic_items
    from dartserve.report import write_reports

    if Path(args.out).exists() and not Path(args.out).is_dir():  # found now, not after the run
        raise ValueError(f"--out {args.out} is a file")
    settings = settings_grid(args.methods.split(","), list(args.budgets), list(args.layers))
    items = jsonl_items(Path(args.dataset), args.limit) if args.dataset else synthetic_items(args.split, args.limit)
    engine = Engine.load(args.model, device=args.device, dtype=_dtype(args.dtype))
    rows = evaluate(engine, items, settings, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, prompt_suffix=args.prompt_suffix)
    title = f"{Path(args.model).name}: {args.dataset or 'synthetic ' + args.split}"
    for kind, path in write_reports(rows, Path(args.out), title).items():
        print(f"{kind}: {path}")
    print((Path(args.out) / "eval.md").read_text())
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dartserve.demo.card import write_card
    from dartserve.demo.train import train

    if args.init and not Path(args.init, "config.json").is_file():
        raise ValueError(f"--init {args.init} is not a checkpoint folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    train(
        out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        init=Path(args.init) if args.init else None, vision_steps=args.vision_steps,
        sampled_steps=args.sampled_steps, sampled_background=args.background, reuse=args.reuse,
        images_from=args.images_from,
    )
    print(json.dumps(write_card(out), indent=2))
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from services.bench_serve import run_serve_bench

    rows = run_serve_bench(
        workloads=tuple(args.workloads.split(",")),
        concurrencies=args.concurrency,
        distributed=args.distributed,
        requests=args.requests,
        width=args.width,
        depth=args.depth,
        threads=args.threads,
        floor_rounds=args.floor_rounds,
        runs=args.runs,
    )
    header = f"{'workload':<8} {'mode':<11} {'conc':>4} {'tok/s':>8} {'engine':>8} {'served':>7} {'TTFT p50':>9} {'ITL p50':>8} {'e2e p50':>8} {'exact':>6}"
    return _report(rows, args.json, header, lambda row: (
        f"{row['workload']:<8} {row['mode']:<11} {row['concurrency']:>4} {row['output_throughput']:>8.1f} {row['engine_output_throughput']:>8.1f} "
        f"{row['served_vs_engine']:>7.2f} {row['ttft_p50_ms']:>9.1f} {row['itl_p50_ms']:>8.1f} {row['e2e_p50_ms']:>8.1f} {str(row['exact']):>6}"
    ))


def _bench_batch(args: argparse.Namespace) -> int:
    from services.bench_batch import run_batch_bench

    rows = run_batch_bench(tuple(args.workload.split(",")), args.requests, args.runs, args.distributed, args.threads, args.width, args.depth)
    header = f"{'workload':<8} {'mode':<11} {'items':>5} {'one by one/s':>12} {'batch/s':>8} {'speed-up':>8} {'same':>5}"
    return _report(rows, args.json, header, lambda row: (
        f"{row['workload']:<8} {row['mode']:<11} {row['requests']:>5} {row['items_per_s']['one_by_one']['median']:>12.2f} "
        f"{row['items_per_s']['batch']['median']:>8.2f} {row['batch_vs_one_by_one']:>8.2f} {str(row['same_answers']):>5}"
    ))


def _bench_load(args: argparse.Namespace) -> int:
    from services.bench_load import run_load_bench

    metrics = dict(item.split("=", 1) for item in args.metrics) if args.metrics else None
    result = run_load_bench(
        url=args.url, requests=args.requests, concurrency=args.concurrency, duration_s=args.duration,
        metrics=metrics, model=args.model, threads=args.threads,
    )
    return _print_json(result, args.json)


def _report(rows: list[dict], path: str | None, header: str, line, machine: bool = False) -> int:
    """A benchmark's rows as a table (``line`` formats one), the machine they ran on where the
    rows do not name it in the table, and the rows as JSON in ``path``."""
    print(header)
    for row in rows:
        print(line(row))
    if machine:
        print(rows[0]["machine"])
    return _print_json(rows, path, echo=False)


def _print_json(result: dict | list, path: str | None, echo: bool = True) -> int:
    """Writes ``result`` to ``path``; ``echo`` prints it too, for a benchmark with no table."""
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w") as out:
            out.write(text + "\n")
    if echo:
        print(text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from services.config import Settings
    from services.launch import distributed_gateway, embedded_gateway, serve_http, start_stage
    from services.request_ids import configure_logging

    configure_logging(args.command)
    flags = {"host": args.host, "port": args.port}
    settings = dataclasses.replace(Settings.from_env(), **{name: value for name, value in flags.items() if value is not None})
    if args.command == "serve":
        serve_http(embedded_gateway(settings), settings)
    elif args.command == "gateway":
        serve_http(distributed_gateway(settings), settings)
    else:
        from dartserve.engine import openmp

        openmp.share_cores()  # the stages share the machine's cores with one another
        start_stage(args.command, settings).wait_for_signal()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from services.config import Settings
    from services.launch import run_worker
    from services.request_ids import configure_logging

    configure_logging("worker")
    run_worker(Settings.from_env(), local=args.local, concurrency=args.concurrency)
    return 0


def _probe(args: argparse.Namespace) -> int:
    from services.config import Settings
    from services.probe import probe

    healthy = probe(args.service, Settings.from_env())
    print("healthy" if healthy else "unhealthy")
    return 0 if healthy else 1


def _batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.batch_client import BatchClient

    client = BatchClient(args.url, os.environ.get("DARTSERVE_API_KEY"))
    if args.action == "submit" and args.output and not args.wait:
        raise ValueError("-o needs --wait; or fetch the results later with 'dartserve batch results ID -o FILE'")
    if args.action == "submit":
        created = client.submit(Path(args.file).read_bytes())
        print(created["id"], flush=True)
        if not args.wait:
            return 0
        try:
            status = client.wait(created["id"])
        except KeyboardInterrupt:
            print(f"stopped following {created['id']}, which runs on: 'dartserve batch status {created['id']}'", file=sys.stderr)
            return 130
        print(json.dumps(status, indent=2))
        if args.output:
            Path(args.output).write_bytes(client.results(created["id"]))
        return 0 if status["status"] == "completed" else 1
    if args.action == "status":
        print(json.dumps(client.status(args.id), indent=2))
    elif args.action == "cancel":
        print(json.dumps(client.cancel(args.id), indent=2))
    elif args.output:
        Path(args.output).write_bytes(client.results(args.id))
    else:
        sys.stdout.write(client.results(args.id).decode())
    return 0


def _pruning_flags(command: argparse.ArgumentParser) -> None:
    """The pruning flags; what they leave out is the server's default (DART at layer 2, 64 of 576)."""
    command.add_argument("--method", help="pruning method (default: dart); none keeps every vision token")
    command.add_argument("--budget", type=int, help="vision tokens kept per request (default: 64 of 576, scaled to the image)")
    command.add_argument("--ratio", type=float, help="fraction of vision tokens kept, in place of --budget")
    command.add_argument("--layer", type=int, help="layer K at which tokens are pruned (default: 2)")


def _service_bench(suites, name: str, text: str, run, requests: int) -> argparse.ArgumentParser:
    """A benchmark that starts dartserve's processes: the arguments they all take."""
    bench = suites.add_parser(name, help=text)
    bench.add_argument("--json", help="write the result to this file")
    bench.add_argument("--requests", type=_positive_int, default=requests)
    bench.add_argument("--model", help="default: the bundled demo model")
    bench.add_argument("--threads", type=_positive_int, help="torch threads per process (default: all cores each)")
    bench.set_defaults(run=run)
    return bench


def build_parser() -> argparse.ArgumentParser:
    from services.config import DEFAULT_PORTS

    parser = argparse.ArgumentParser(prog="dartserve", description="Multimodal LLM serving with DART visual-token pruning.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="answer a prompt about images with a local or hub checkpoint")
    generate.add_argument("--model", default=default_model(), help="Hugging Face model id or local checkpoint folder")
    generate.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    generate.add_argument("--prompt", required=True)
    _pruning_flags(generate)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--dtype", choices=DTYPE_NAMES, default=None)
    generate.add_argument("--stats", action="store_true", help="print the answer's usage, timings and pruning as JSON on stderr, as /v1/answer names them")
    generate.set_defaults(run=_generate)

    ask = commands.add_parser("ask", help="ask the default model (the bundled demo) a question about one image")
    ask.add_argument("image", nargs=1)
    ask.add_argument("prompt")
    ask.add_argument("--model", default=default_model())
    _pruning_flags(ask)
    ask.add_argument("--stats", action="store_true", help="print the answer's usage, timings and pruning as JSON on stderr, as /v1/answer names them")
    ask.set_defaults(run=_generate, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0, device="cpu", dtype=None)

    evaluation = commands.add_parser("eval", help="accuracy of pruning methods on a dataset: JSON, markdown and a plot")
    evaluation.add_argument("--model", default=default_model())
    evaluation.add_argument("--dataset", help="a JSONL file of {image, question, answer, type}; default: the synthetic task")
    evaluation.add_argument("--split", default="test", choices=("validation", "test"), help="split of the synthetic task")
    evaluation.add_argument("--prompt-suffix", default="", help='appended to every question, e.g. " Answer the question using a single word or phrase."')
    evaluation.add_argument("--methods", default="none,dart,fastv,divprune,cdpruner,random,pooling,window_fastv")
    evaluation.add_argument("--budgets", type=_csv_ints, default=(192, 128, 64, 32))
    evaluation.add_argument("--layers", type=_csv_ints, default=(0, 2), help="pruning layers K, comma-separated (0: before the LLM; methods that read attention skip it)")
    evaluation.add_argument("--limit", type=_positive_int, help="only the first N examples")
    evaluation.add_argument("--batch-size", type=_positive_int, default=8)
    evaluation.add_argument("--max-new-tokens", type=_positive_int, default=8)
    evaluation.add_argument("--out", default="eval-out", help="folder for eval.json, eval.md and eval.png")
    evaluation.add_argument("--device", default="cpu")
    evaluation.add_argument("--dtype", choices=DTYPE_NAMES, default=None)
    evaluation.set_defaults(run=_eval)

    train = commands.add_parser("train-demo", help="train the demo model on the synthetic task")
    train.add_argument("--out", required=True)
    train.add_argument("--steps", type=int, default=300, help="steps of phase three (every patch); 0 skips it")
    train.add_argument("--sampled-steps", type=int, default=6500, help="steps of phase two (objects and sampled background); 0 skips it")
    train.add_argument("--background", type=int, default=64, help="phase two's most background patches per image")
    train.add_argument("--reuse", type=_positive_int, default=4, help="phase two's conversations about each image, in consecutive steps")
    train.add_argument("--batch-size", type=_positive_int, default=16, help="conversations per step")
    train.add_argument("--images-from", type=int, default=0, help="phase three's first training image (to train on from a checkpoint with images it was not trained on)")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--vision-steps", type=int, default=1500, help="steps of phase one (the vision tower alone); 0 skips it")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--init", help="train on from this checkpoint")
    train.add_argument("--threads", type=_positive_int, help="torch threads (results differ slightly with the count)")
    train.set_defaults(run=_train_demo)

    service_help = {
        "serve": "the gateway with every stage and a batch worker in one process and an in-memory store (embedded mode)",
        "gateway": "the REST gateway in front of the gRPC stages (distributed mode)",
        "vision": "the vision encoder gRPC service",
        "pruner": "the pruning prefill gRPC service",
        "generator": "the decoding gRPC service",
    }
    for name, text in service_help.items():
        service = commands.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}; configured by DARTSERVE_* environment variables (docs/configuration.md).")
        service.add_argument("--host", help="interface to bind (default: DARTSERVE_HOST, else 127.0.0.1)")
        service.add_argument("--port", type=_port, help=f"port to listen on (default: DARTSERVE_PORT, else {DEFAULT_PORTS['gateway' if name == 'serve' else name]})")
        service.set_defaults(run=_serve)

    worker = commands.add_parser("worker", help="a Celery worker that answers batch items (docs/api.md, Batches)")
    worker.add_argument("--local", action="store_true", help="run the stages in this process (embedded mode) instead of over gRPC")
    worker.add_argument("--concurrency", type=_positive_int, help="items at once, each on a thread (default: DARTSERVE_BATCH_CONCURRENCY, else half of DARTSERVE_MAX_NUM_SEQS)")
    worker.set_defaults(run=_worker)

    probe = commands.add_parser("probe", help="exit 0 if a service on this host is healthy (container health checks)")
    probe.add_argument("service", choices=("serve", "gateway", "vision", "pruner", "generator", "worker"))
    probe.set_defaults(run=_probe)

    batch = commands.add_parser("batch", help="submit a JSONL batch to a gateway, follow it, fetch its results")
    actions = batch.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="submit a JSONL file of /v1/answer requests, each with a custom_id")
    submit.add_argument("file")
    submit.add_argument("--wait", action="store_true", help="follow the batch with a progress bar until it finishes")
    submit.add_argument("-o", "--output", help="with --wait: write the results (JSONL) here")
    for action, text in (("status", "a batch's status and counts"), ("results", "a batch's results as JSONL, in input order"), ("cancel", "cancel a batch")):
        command = actions.add_parser(action, help=text)
        command.add_argument("id")
        if action == "results":
            command.add_argument("-o", "--output", help="write the results here instead of stdout")
    for command in actions.choices.values():
        command.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway")
    batch.set_defaults(run=_batch)

    bench = commands.add_parser("bench", help="benchmarks, JSON out")
    suites = bench.add_subparsers(dest="suite", required=True)
    prefill = suites.add_parser("prefill", help="prefill time with and without DART on a LLaVA-1.5-shaped model")
    prefill.add_argument("--json", help="write the rows to this file")
    prefill.add_argument("--width", type=_positive_int, default=1024, help="hidden size: a multiple of 128, or even below 128 (LLaVA-1.5-7B: 4096)")
    prefill.add_argument("--depth", type=_positive_int, default=8, help="decoder layers (LLaVA-1.5-7B: 32)")
    prefill.add_argument("--layer", type=int, default=2, help="pruning layer K")
    prefill.add_argument("--budgets", type=_csv_ints, default=(192, 128, 64))
    prefill.add_argument("--methods", default="dart", help="comma-separated pruning methods")
    prefill.add_argument("--runs", type=_positive_int, default=5)
    prefill.add_argument("--device", default="cpu")
    prefill.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    prefill.set_defaults(run=_bench_prefill)
    engine = suites.add_parser("engine", help="the engine core under closed-loop load: throughput, TTFT, inter-token latency, KV pool")
    engine.add_argument("--json", help="write the rows to this file")
    engine.add_argument("--workloads", default="decode", help="comma-separated: decode (LLaVA-shaped random model), demo (the bundled model's short answers), describe (its descriptions)")
    engine.add_argument("--concurrency", type=_csv_ints, default=(1, 4, 16), help="clients, comma-separated")
    engine.add_argument("--runs", type=_positive_int, default=3)
    engine.add_argument("--requests", type=_positive_int, help="requests per run (default: 32 decode, 64 demo)")
    engine.add_argument("--width", type=_positive_int, default=1024, help="the decode workload's hidden size (LLaVA-1.5-7B: 4096)")
    engine.add_argument("--depth", type=_positive_int, default=8, help="the decode workload's decoder layers (LLaVA-1.5-7B: 32)")
    engine.add_argument("--device", default="cpu")
    engine.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    engine.add_argument("--kv-cache-mb", type=float, help="the KV pool (default: 80%% of free CUDA memory, or 2048 MB on the CPU)")
    engine.add_argument("--max-num-batched-tokens", type=_positive_int, help="tokens one step runs at most (default 2048)")
    engine.add_argument("--max-num-seqs", type=_positive_int, help="requests running at once at most (default 64)")
    engine.add_argument("--pool-requests", type=_positive_int, default=8, help="the pool of the capacity count holds this many unpruned prompts")
    engine.add_argument("--threads", type=_positive_int, help="torch threads (default: all cores)")
    engine.set_defaults(run=_bench_engine)
    serve = suites.add_parser("serve", help="the service under closed-loop load against the engine alone: throughput, TTFT, ITL, memory")
    serve.add_argument("--json", help="write the rows to this file")
    serve.add_argument("--workloads", default="decode,demo", help="comma-separated: decode (LLaVA-shaped random model), demo (the bundled model's short answers), describe (its descriptions)")
    serve.add_argument("--concurrency", type=_csv_ints, default=(1, 4, 16), help="clients, comma-separated")
    serve.add_argument("--distributed", action="store_true", help="the three gRPC stages and the gateway, with a private Redis (default: embedded)")
    serve.add_argument("--requests", type=_positive_int, help="requests per concurrency (default: 32 decode, 64 demo)")
    serve.add_argument("--width", type=_positive_int, default=1024, help="the decode workload's hidden size")
    serve.add_argument("--depth", type=_positive_int, default=8, help="the decode workload's decoder layers")
    serve.add_argument("--threads", type=_positive_int, help="torch threads per process (default: all cores each)")
    serve.add_argument("--floor-rounds", type=_positive_int, default=100, help="rounds of the design's floor (distributed): bare gRPC stages that only wait")
    serve.add_argument("--runs", type=_positive_int, default=3, help="runs of the service and of the engine alone, in turn, at each concurrency above 1 (medians reported)")
    serve.set_defaults(run=_bench_serve)
    batch_bench = suites.add_parser("batch", help="a batch on one worker against the same requests one by one to /v1/answer: items per second, the same answers")
    batch_bench.add_argument("--json", help="write the rows to this file")
    batch_bench.add_argument("--workload", default="decode", help="comma-separated: decode (LLaVA-shaped random model, 64 new tokens), demo (the bundled model), describe (the bundled model describing pictures, up to 48 new tokens)")
    batch_bench.add_argument("--requests", type=_positive_int, help="requests per workload (default: 48 decode, 200 demo, 48 describe)")
    batch_bench.add_argument("--runs", type=_positive_int, default=3)
    batch_bench.add_argument("--distributed", action="store_true", help="the three gRPC stages, the gateway and one dartserve worker (default: dartserve serve and its own worker)")
    batch_bench.add_argument("--width", type=_positive_int, default=1024, help="the decode workload's hidden size")
    batch_bench.add_argument("--depth", type=_positive_int, default=8, help="the decode workload's decoder layers")
    batch_bench.add_argument("--threads", type=_positive_int, help="torch threads per process (default: all cores each)")
    batch_bench.set_defaults(run=_bench_batch)
    load = _service_bench(suites, "load", "bounded load on a gateway: throughput, latency percentiles, errors, peak memory", _bench_load, 1000)
    load.add_argument("--url", help="a running gateway (default: start distributed mode with the bench's own Redis)")
    load.add_argument("--concurrency", type=_positive_int, default=16)
    load.add_argument("--duration", type=float, default=600.0, help="stop sending after this many seconds")
    load.add_argument("--metrics", nargs="*", metavar="NAME=URL", help="with --url: /metrics URLs of the services whose peak memory to report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # a server and a benchmark of the engine run their models alike
    try:
        return args.run(args)
    except ValueError as error:
        print(f"dartserve: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the shell's status for SIGINT, and no traceback
        print("dartserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
