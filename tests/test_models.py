"""The engine against stock transformers (no pruning) and against the masked reference (pruning),
for every model family, on tiny random checkpoints."""

import pytest
import torch

from dartserve.engine import Request
from dartserve.models import SamplingConfig, prefill
from dartserve.models.decode import decode_step
from dartserve.pruning import PruningConfig, available_methods
from reference import masked_reference
from tiny_checkpoints import make_image

STEPS = 5
ATOL = 1e-4
PROMPT = "Describe the picture in a few words."


def run_engine(adapter, request, pruning, steps=STEPS):
    """Prefill, then greedy decode step by step, keeping every step's logits."""
    result = prefill(adapter, [request], pruning)
    logits = [result.logits[0]]
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps):
        logits.append(decode_step(adapter, result.cache, torch.tensor([tokens[-1]]))[0])
        tokens.append(int(logits[-1].argmax()))
    return torch.stack(logits), tokens, result


def test_unpruned_matches_stock_generate(engine):
    adapter = engine.adapter
    images = [make_image(3)]
    request = engine.vision.encode(images, PROMPT)
    logits, tokens, _ = run_engine(adapter, request, PruningConfig(method="none"))

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


METHODS = [m for m in available_methods() if m != "none"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("images", [1, 2], ids=["one-image", "two-images"])
def test_pruned_matches_masked_reference(engine, method, images):
    adapter = engine.adapter
    request = engine.vision.encode([make_image(10 + i) for i in range(images)], PROMPT)
    pruning = PruningConfig(method=method, budget=10 * images, layer=2)
    logits, tokens, result = run_engine(adapter, request, pruning)
    ref_logits, ref_tokens, ref_kept, ref_token_mask, ref_cache = masked_reference(adapter, request, pruning, STEPS)

    assert result.kept_positions[0].tolist() == ref_kept.tolist()
    assert len(result.kept_positions[0]) == 10 * images
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)

    # The ragged cache holds exactly the reference's keys and values of the tokens each layer kept.
    seq = len(request.input_ids)
    kept_slots = torch.cat([ref_token_mask, torch.ones(STEPS, dtype=torch.bool)])
    for layer in range(adapter.num_layers):
        want_keys, want_values = ref_cache.layers[layer].keys, ref_cache.layers[layer].values
        if layer >= pruning.layer:
            want_keys, want_values = want_keys[:, :, kept_slots], want_values[:, :, kept_slots]
        torch.testing.assert_close(result.cache.keys[layer], want_keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(result.cache.values[layer], want_values, atol=ATOL, rtol=0)
    assert result.cache.kept_tokens() == [seq + STEPS, seq - request.num_vision_tokens + 10 * images + STEPS]


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
                prefill(adapter, [request], PruningConfig(method=method, budget=cells + 1))
        assert not layers_run
        assert len(prefill(adapter, [request], PruningConfig(method="pooling", budget=cells)).kept_positions[0]) == cells
    finally:
        hook.remove()


def test_pruning_shrinks_the_cache_from_layer_k(engine):
    request = engine.vision.encode([make_image(5)], PROMPT)
    full = prefill(engine.adapter, [request], PruningConfig(method="none"))
    pruned = prefill(engine.adapter, [request], PruningConfig(method="dart", budget=8, layer=1))
    seq = len(request.input_ids)
    assert pruned.cache.kept_tokens() == [seq, seq - request.num_vision_tokens + 8]
    assert [pruned.cache.keys[i].shape[2] for i in range(4)] == [seq] + [seq - request.num_vision_tokens + 8] * 3
    assert pruned.cache.nbytes() < full.cache.nbytes()


@pytest.mark.parametrize("pruning", [PruningConfig(method="dart", ratio=0.3), PruningConfig(method="none")], ids=["dart", "none"])
def test_batch_equals_single_runs(engine, pruning):
    requests = [
        Request([make_image(20)], "What colour dominates?", SamplingConfig(max_new_tokens=6)),
        Request([make_image(21, (120, 64)), make_image(22)], "Compare the two images in detail please.", SamplingConfig(max_new_tokens=4)),
        Request([make_image(23, (64, 112))], "Is it dark?", SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.8, seed=7)),
    ]
    batch = engine.generate_batch(requests, pruning)
    singles = [engine.generate_batch([r], pruning)[0] for r in requests]
    for got, want in zip(batch, singles):
        assert got.token_ids == want.token_ids
        assert got.kept_positions == want.kept_positions
        assert got.stats.cached_tokens == want.stats.cached_tokens
        for layer in range(engine.adapter.num_layers):
            torch.testing.assert_close(got.cache.keys[layer], want.cache.keys[layer], atol=ATOL, rtol=0)
            torch.testing.assert_close(got.cache.values[layer], want.cache.values[layer], atol=ATOL, rtol=0)

    encoded = [engine.vision.encode(r.images, r.prompt) for r in requests]
    batched = prefill(engine.adapter, encoded, pruning)
    for b, request in enumerate(encoded):
        single = prefill(engine.adapter, [request], pruning)
        torch.testing.assert_close(batched.logits[b], single.logits[0], atol=ATOL, rtol=0)
