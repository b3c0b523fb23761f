"""Decoding options, multi-image layouts and the command line, through the public engine API."""

import dataclasses
import json

import pytest
import torch

from services.cli import main
from dartserve.engine.requests import CoreRequest
from dartserve.models import SamplingConfig
from dartserve.models.decode import pick_token
from dartserve.pruning import PruningConfig, Selection, registry
from tiny_checkpoints import make_image

PROMPT = "What is shown here?"


def test_stop_tokens_end_generation(engine):
    images = [make_image(8)]
    free = engine.generate(images, PROMPT, sampling=SamplingConfig(max_new_tokens=8))
    stop = free.token_ids[2]
    stopped = engine.generate(images, PROMPT, sampling=SamplingConfig(max_new_tokens=8, stop_token_ids=(stop,)))
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop) + 1]
    assert stopped.stats.new_tokens == len(stopped.token_ids)


def test_max_new_tokens_and_text(engine):
    result = engine.generate([make_image(8)], PROMPT, sampling=SamplingConfig(max_new_tokens=3))
    assert len(result.token_ids) == 3
    assert result.text == engine.adapter.processor.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_eos_ends_generation(engines):
    # With this image the tiny Qwen2-VL answers one token, then its EOS (<|im_end|>).
    engine = engines["qwen2_vl"]
    result = engine.generate([make_image(7)], PROMPT, sampling=SamplingConfig(max_new_tokens=8))
    assert len(result.token_ids) == 2 and result.token_ids[-1] in engine.adapter.eos_token_ids
    assert result.stats.cached_tokens == [result.stats.prompt_tokens + 1]


def test_pick_token_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    draws = lambda top_p: {pick_token(logits, SamplingConfig(temperature=1.0, top_p=top_p), step) for step in range(300)}  # noqa: E731
    assert draws(0.5) == {1}  # the top token alone reaches 0.5
    assert draws(0.6) == {1, 2}  # 0.5 falls short: the token that crosses the threshold joins
    assert draws(0.8) == {1, 2}
    assert draws(0.81) == {1, 2, 3}
    assert draws(1.0) == {0, 1, 2, 3}
    assert pick_token(logits, SamplingConfig(), 0) == 1


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(engines):
    engine = engines["qwen2_vl"]
    images = [make_image(9)]
    hot = lambda seed, top_p=1.0: engine.generate(  # noqa: E731
        images, PROMPT, pruning=PruningConfig(budget=12), sampling=SamplingConfig(max_new_tokens=12, temperature=1.5, top_p=top_p, seed=seed)
    ).token_ids
    greedy = engine.generate(images, PROMPT, pruning=PruningConfig(budget=12), sampling=SamplingConfig(max_new_tokens=12)).token_ids
    assert hot(1) == hot(1)
    assert hot(1) != hot(2)
    assert hot(1) != greedy
    assert hot(5, top_p=1e-6) == greedy


@pytest.mark.parametrize(
    "kwargs", [dict(max_new_tokens=0), dict(max_new_tokens=1.5), dict(temperature=-1), dict(top_p=0), dict(top_p=1.2)]
)
def test_sampling_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_vision_spans_come_from_the_token_ids(engines):
    engine = engines["llava_next"]
    request = engine.vision.encode([make_image(1, (160, 60)), make_image(2, (60, 160))], PROMPT)
    image_tokens = (request.input_ids == engine.adapter.image_token_id).nonzero().flatten().tolist()
    assert [p for s in request.spans for p in range(s.start, s.end)] == image_tokens
    assert request.spans[0].length != request.spans[1].length
    for span in request.spans:
        base, tiles = span.grids
        assert base.size + tiles.h * (tiles.w + 1) == span.length
    pruned = engine.generate([make_image(1, (160, 60)), make_image(2, (60, 160))], PROMPT, pruning=PruningConfig(method="pooling", budget=20))
    assert pruned.stats.vision_tokens_kept == 20


def test_text_only_prompt(engine):
    result = engine.generate([], PROMPT, pruning=PruningConfig(budget=8), sampling=SamplingConfig(max_new_tokens=4))
    assert result.stats.vision_tokens == 0
    assert len(result.token_ids) == 4 or result.token_ids[-1] in engine.adapter.eos_token_ids


def test_context_length_is_enforced(engines):
    engine = engines["llava"]
    limit = engine.adapter.max_positions
    with pytest.raises(ValueError, match="positions"):
        engine.generate([make_image(1)], "word " * limit)
    prompt_tokens = engine.generate([make_image(1)], PROMPT, sampling=SamplingConfig(max_new_tokens=1)).stats.prompt_tokens
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([make_image(1)], PROMPT, sampling=SamplingConfig(max_new_tokens=limit - prompt_tokens + 1))
    engine.generate([make_image(1)], PROMPT, sampling=SamplingConfig(max_new_tokens=limit - prompt_tokens))


def test_bad_requests_are_value_errors(engines):
    engine = engines["qwen2_vl"]
    with pytest.raises(ValueError, match="list"):
        engine.generate(None, PROMPT)
    with pytest.raises(ValueError, match="string"):
        engine.generate([make_image(1)], None)
    request = engine.vision.encode([make_image(1)], PROMPT)
    check = lambda prompt: engine.loop.core.check(CoreRequest("r", prompt, PruningConfig()))  # noqa: E731
    broken = dataclasses.replace(request, image_features=request.image_features[:-1])
    with pytest.raises(ValueError, match="vision tokens"):
        check(broken)
    shifted = dataclasses.replace(request, spans=[dataclasses.replace(request.spans[0], start=request.spans[0].start + 1)])
    with pytest.raises(ValueError, match="placeholder"):
        check(shifted)
    flat = dataclasses.replace(request, positions=request.positions[:1])
    with pytest.raises(ValueError, match="positions"):
        check(flat)


def test_a_misbehaving_method_is_caught(engines, monkeypatch):
    def overspend(ctx, span, budget, config):
        return Selection(torch.arange(span.start, span.start + budget + 1))

    monkeypatch.setitem(registry._METHODS, "test_overspend", registry.MethodSpec("test_overspend", overspend, (), False, False, None, None))

    engine = engines["llava"]
    with pytest.raises(ValueError, match="test_overspend"):
        engine.generate([make_image(1)], PROMPT, pruning=PruningConfig(method="test_overspend", budget=8))


def test_cli_generate(checkpoints, tmp_path, capsys):
    image = tmp_path / "cat.png"
    make_image(3).save(image)
    code = main(["generate", "--model", str(checkpoints["llava"]), "--image", str(image), "--prompt", PROMPT, "--budget", "9", "--max-new-tokens", "4", "--stats"])
    assert code == 0
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert stats["usage"]["vision_tokens"] == 36 and stats["usage"]["kept_vision_tokens"] == 9
    assert stats["pruning"] == {"method": "dart", "budget": 9, "layer": 2, "pivot_image": 4, "pivot_text": 4}
    # No flags: the server's default, 64 of every 576 vision tokens (4 of these 36).
    assert main(["generate", "--model", str(checkpoints["llava"]), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "2", "--stats"]) == 0
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["pruning"]["budget"] == 4


def test_cli_reports_bad_input_as_an_error(checkpoints, tmp_path, capsys):
    image = tmp_path / "cat.png"
    make_image(3).save(image)
    code = main(["generate", "--model", str(checkpoints["llava"]), "--image", str(image), "--prompt", PROMPT, "--budget", "99"])
    assert code == 2
    assert "larger than" in capsys.readouterr().err
    # A zero amount is an amount (refused as one); keeping every token reads no layer.
    for flags, says in ((["--budget", "0"], "budget must be"), (["--ratio", "0"], "ratio"), (["--method", "none", "--layer", "3"], "does not use layer")):
        assert main(["generate", "--model", str(checkpoints["llava"]), "--image", str(image), "--prompt", PROMPT, *flags]) == 2
        err = capsys.readouterr().err
        assert says in err, err


def test_bench_prefill_rows(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "prefill", "--width", "64", "--depth", "4", "--runs", "1", "--budgets", "64,8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["method"], r["budget"]) for r in rows] == [("none", 576), ("dart", 64), ("dart", 8)]
    for row in rows:
        assert {"prefill_ms", "speedup", "ideal_speedup", "selection_share", "kv_bytes"} <= set(row)
    none, dart64, _ = rows
    full, kept = none["prompt_tokens"], dart64["tokens_after_k"]
    assert kept == full - 576 + 64
    assert dart64["ideal_speedup"] == round(4 * full / (2 * full + 2 * kept), 3)
    # Per layer and token, keys and values of 64 float32 channels: 2 * 64 * 4 bytes.
    assert none["kv_bytes"] == 4 * full * 512
    assert dart64["kv_bytes"] == (2 * full + 2 * kept) * 512


def test_cli_rejects_a_missing_image(checkpoints, tmp_path, capsys):
    code = main(["generate", "--model", str(checkpoints["llava"]), "--image", str(tmp_path / "none.png"), "--prompt", PROMPT])
    assert code == 2
    assert "cannot read image" in capsys.readouterr().err


def test_cli_reports_bad_models_devices_images_and_sizes_as_errors(checkpoints, tmp_path, capsys):
    image, damaged = tmp_path / "cat.png", tmp_path / "damaged.png"
    make_image(3).save(image)
    damaged.write_bytes(image.read_bytes()[:200])  # a PNG cut short: its header reads, its pixels do not
    generate = ["generate", "--model", str(checkpoints["llava"]), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "1"]
    cases = [
        (["generate", "--model", str(tmp_path / "no-such-model"), "--image", str(image), "--prompt", PROMPT], "cannot load model"),
        (generate + ["--device", "gpu"], "not a device"),
        (generate + ["--device", "cuda:7"], "not available"),
        (["generate", "--model", str(checkpoints["llava"]), "--image", str(damaged), "--prompt", PROMPT], "cannot read image"),
        (["bench", "prefill", "--width", "255", "--depth", "1", "--runs", "1"], "even size"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["bench", "prefill", "--depth", "0"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_every_method(checkpoints, dtype):
    from dartserve.engine import Engine, Request
    from dartserve.pruning import available_methods

    engine = Engine.load(str(checkpoints["qwen2_vl"]), dtype=getattr(torch, dtype))
    for method in available_methods():
        pruning = PruningConfig(method=method, budget=12) if method != "none" else PruningConfig(method="none")
        request = Request([make_image(2)], PROMPT, SamplingConfig(max_new_tokens=3))
        (result,) = engine.generate_batch([request], pruning, return_cache=True)
        assert result.stats.vision_tokens_kept == (12 if method != "none" else result.stats.vision_tokens)
        assert result.cache.keys[-1].dtype == getattr(torch, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(checkpoints):
    from dartserve.engine import Engine
    from dartserve.pruning import available_methods

    cpu, gpu = Engine.load(str(checkpoints["llava_next"])), Engine.load(str(checkpoints["llava_next"]), device="cuda")
    for method in available_methods():
        pruning = PruningConfig(method=method, budget=12)
        want = cpu.generate([make_image(2)], PROMPT, pruning=pruning, sampling=SamplingConfig(max_new_tokens=4))
        got = gpu.generate([make_image(2)], PROMPT, pruning=pruning, sampling=SamplingConfig(max_new_tokens=4))
        assert got.kept_positions == want.kept_positions
        assert got.token_ids == want.token_ids
