"""The engine against stock transformers (no pruning), the pruned cache's shape and the batch API,
for every model family, on tiny random checkpoints (the core against the masked reference:
``test_engine_core``)."""

import pytest
import torch

from dartserve.engine import Request
from dartserve.engine.core import EngineCore
from dartserve.engine.requests import CoreRequest
from dartserve.models import SamplingConfig
from dartserve.pruning import PruningConfig
from tiny_checkpoints import make_image

STEPS = 5
ATOL = 1e-4
PROMPT = "Describe the picture in a few words."


def run_engine(engine, request, pruning, steps=STEPS):
    """The core alone on one request, greedy, keeping every step's logits and the cache."""
    core = EngineCore(engine.adapter)
    core.add_request(CoreRequest("r", request, pruning, SamplingConfig(max_new_tokens=steps + 1, ignore_eos=True), export_cache=True, keep_logits=True))
    outputs = []
    while core.has_work:
        outputs += core.step()
    return torch.stack([l for o in outputs for l in o.logits]), [t for o in outputs for t in o.tokens], outputs


def test_unpruned_matches_stock_generate(engine):
    adapter = engine.adapter
    images = [make_image(3)]
    request = engine.vision.encode(images, PROMPT)
    logits, tokens, _ = run_engine(engine, request, PruningConfig(method="none"))

    inputs = adapter.processor(text=[adapter.prompt_text(PROMPT, 1)], images=images, return_tensors="pt")
    stock = adapter.model.generate(
        **inputs, max_new_tokens=STEPS + 1, do_sample=False, output_logits=True, return_dict_in_generate=True,
        eos_token_id=None,
    )
    stock_tokens = stock.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    assert tokens == stock_tokens
    torch.testing.assert_close(logits, torch.stack(stock.logits)[:, 0].float(), atol=ATOL, rtol=0)


def test_engine_generate_matches_stock_tokens(engine):
    adapter = engine.adapter
    images = [make_image(4)]
    result = engine.generate(images, PROMPT, sampling=SamplingConfig(max_new_tokens=8))
    inputs = adapter.processor(text=[adapter.prompt_text(PROMPT, 1)], images=images, return_tensors="pt")
    stock = adapter.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert result.token_ids == stock[0, inputs["input_ids"].shape[1] :].tolist()
    assert result.stats.vision_tokens == result.stats.vision_tokens_kept == int((inputs["input_ids"] == adapter.image_token_id).sum())


def test_grid_methods_refuse_budgets_past_the_grid_before_any_layer_runs(engines):
    adapter = engines["llava_next"].adapter
    request = engines["llava_next"].vision.encode([make_image(5)], PROMPT)
    (span,) = request.spans
    cells = sum(g.size for g in span.grids)
    assert cells < span.length  # the row separators are no grid cells
    layers_run = []
    hook = adapter.layers[0].register_forward_hook(lambda *_: layers_run.append(1))
    try:
        for method in ("pooling", "window_fastv"):
            with pytest.raises(ValueError, match="grid cells only"):
                EngineCore(adapter).add_request(CoreRequest("r", request, PruningConfig(method=method, budget=cells + 1)))
        assert not layers_run
        _, _, outputs = run_engine(engines["llava_next"], request, PruningConfig(method="pooling", budget=cells))
        assert len(outputs[0].kept_positions) == cells
    finally:
        hook.remove()


def test_pruning_shrinks_the_cache_from_layer_k(engine):
    request = engine.vision.encode([make_image(5)], PROMPT)
    full = run_engine(engine, request, PruningConfig(method="none"), steps=0)[2][-1].cache
    pruned = run_engine(engine, request, PruningConfig(method="dart", budget=8, layer=1), steps=0)[2][-1].cache
    seq = len(request.input_ids)
    assert pruned.kept_tokens() == [seq, seq - request.num_vision_tokens + 8]
    assert [pruned.keys[i].shape[2] for i in range(4)] == [seq] + [seq - request.num_vision_tokens + 8] * 3
    assert pruned.nbytes() < full.nbytes()


@pytest.mark.parametrize("pruning", [PruningConfig(method="dart", ratio=0.3), PruningConfig(method="none")], ids=["dart", "none"])
def test_batch_equals_single_runs(engine, pruning):
    requests = [
        Request([make_image(20)], "What colour dominates?", SamplingConfig(max_new_tokens=6)),
        Request([make_image(21, (120, 64)), make_image(22)], "Compare the two images in detail please.", SamplingConfig(max_new_tokens=4)),
        Request([make_image(23, (64, 112))], "Is it dark?", SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.8, seed=7)),
    ]
    batch = engine.generate_batch(requests, pruning, return_cache=True)
    singles = [engine.generate_batch([r], pruning, return_cache=True)[0] for r in requests]
    for got, want in zip(batch, singles):
        assert got.token_ids == want.token_ids
        assert got.kept_positions == want.kept_positions
        assert got.stats.cached_tokens == want.stats.cached_tokens
        for layer in range(engine.adapter.num_layers):
            torch.testing.assert_close(got.cache.keys[layer], want.cache.keys[layer], atol=ATOL, rtol=0)
            torch.testing.assert_close(got.cache.values[layer], want.cache.values[layer], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_each_role_loads_only_its_weights_and_together_they_answer_as_the_whole_model(checkpoints, engines, family):
    from dartserve.models.loading import load_adapter

    whole = engines[family]
    vision = load_adapter(str(checkpoints[family]), parts=("vision",))
    language = load_adapter(str(checkpoints[family]), parts=("language",))
    assert vision.fingerprint == language.fingerprint == whole.adapter.fingerprint
    count = lambda adapter: sum(p.numel() for p in adapter.model.parameters())  # noqa: E731
    assert count(vision) + count(language) == count(whole.adapter)  # nothing held twice
    assert not vision.layers and vision.lm_head is None
    assert all(getattr(language.model.model, name) is None for name in language.vision_modules)

    prompt = vision.encode([make_image(6)], PROMPT)
    pruning = PruningConfig(budget=10)
    core = EngineCore(language)
    core.add_request(CoreRequest("r", prompt, pruning, SamplingConfig(max_new_tokens=5)))
    outputs = []
    while core.has_work:
        outputs += core.step()
    want = whole.generate([make_image(6)], PROMPT, pruning=pruning, sampling=SamplingConfig(max_new_tokens=5))
    assert [t for o in outputs for t in o.tokens] == want.token_ids
    with pytest.raises(ValueError, match="parts"):
        load_adapter(str(checkpoints[family]), parts=("everything",))
