"""Prefill with the pruning hook: layers 0..K-1 on the full sequence, a pruning method at K,
layers K..L-1 on the kept tokens, which keep their original positions."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from dartserve.checks import SettingError
from dartserve.kv.cache import RaggedKVCache
from dartserve.models.attention import attention_mask, last_token_attention
from dartserve.models.base import EncodedPrompt, ModelAdapter
from dartserve.pruning.base import ImageSpan, Selection, SelectionContext
from dartserve.pruning.config import GRID_METHODS, PruningConfig
from dartserve.pruning.registry import get_method
from dartserve.timing import stopwatch


@dataclass
class PrefillResult:
    cache: RaggedKVCache
    logits: torch.Tensor  # [batch, vocab]: the distribution of each request's first new token
    kept_positions: list[torch.Tensor]  # per request: sequence indices of the vision tokens kept
    selection_s: float  # the pruning methods' time, over the whole batch


def _pad(rows: list[torch.Tensor], fill: float | int) -> torch.Tensor:
    """Stacks ``[n_b, ...]`` rows into ``[batch, max n, ...]``, padding on the right."""
    longest = max(len(r) for r in rows)
    out = rows[0].new_full((len(rows), longest, *rows[0].shape[1:]), fill)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


def _pad_positions(rows: list[torch.Tensor]) -> torch.Tensor:
    """``[P, n_b]`` rotary positions per request into ``[P, batch, max n]``."""
    return _pad([row.T for row in rows], 0).permute(2, 0, 1)


def _cat_positions(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.empty(0, dtype=torch.long)] + [p.cpu() for p in parts])


def _run_layers(adapter: ModelAdapter, hidden, positions, token_index, cache, layers: range):
    """Runs ``layers`` over a group's slots; also returns the last layer's input and the rotary
    tables, which a selection may need."""
    cos_sin = adapter.rope(hidden, positions)
    mask = attention_mask(token_index, hidden.shape[1])
    for i in layers:
        layer_input = hidden
        hidden = adapter.layers[i](
            hidden, attention_mask=mask, position_embeddings=cos_sin, past_key_values=cache, use_cache=True
        )
    return hidden, layer_input, cos_sin


@torch.inference_mode()
def prefill(adapter: ModelAdapter, requests: list[EncodedPrompt], pruning: PruningConfig) -> PrefillResult:
    """Prefills a batch of requests, each pruned on its own, into one ragged cache."""
    if not requests:
        raise ValueError("prefill needs at least one request")
    pruning.check_layers(adapter.num_layers)
    budgets = [pruning.span_budgets([s.length for s in r.spans]) for r in requests]
    for request, shares in zip(requests, budgets):
        check_request(adapter, request, pruning, shares)
    num_layers, device = adapter.num_layers, adapter.device
    cut = pruning.layer if pruning.prunes else num_layers
    lengths = [len(r.input_ids) for r in requests]

    hidden = _pad([adapter.embed(r) for r in requests], 0.0)
    token_index = _pad([torch.arange(n, device=device) for n in lengths], -1)
    positions = _pad_positions([r.positions.to(device) for r in requests])
    cache = RaggedKVCache(
        keys=[None] * num_layers,
        values=[None] * num_layers,
        layer_group=(0,) * cut + (1,) * (num_layers - cut),
        token_index=[token_index],
        next_position=torch.stack([r.positions.max() + 1 for r in requests]).to(device),
    )
    hidden, layer_input, (cos, sin) = _run_layers(adapter, hidden, positions, token_index, cache, range(cut))

    selection_times: list[float] = []
    if cut == num_layers:
        kept_positions = [_cat_positions([torch.arange(s.start, s.end) for s in r.spans]) for r in requests]
    else:
        method = get_method(pruning.method)
        normed = adapter.text.norm(hidden)
        keys = cache.keys[cut - 1]
        reduced, kept_index, kept_positions = [], [], []
        for b, request in enumerate(requests):
            n = lengths[b]
            ctx = SelectionContext(
                hidden=hidden[b, :n],
                normed=normed[b, :n],
                keys=keys[b, :, :n].transpose(0, 1).reshape(n, -1),
                vision=request.input_ids.to(device) == adapter.image_token_id,
                last_attention_fn=partial(
                    last_token_attention,
                    adapter.layers[cut - 1],
                    layer_input[b, n - 1],
                    cos[b, n - 1],
                    sin[b, n - 1],
                    keys[b, :, :n],
                ),
            )
            with stopwatch(device, selection_times):
                selections = [method(ctx, span, budget, pruning) for span, budget in zip(request.spans, budgets[b])]
            for span, budget, selection in zip(request.spans, budgets[b], selections):
                check_selection(pruning.method, span, budget, selection)
            rows, index = _reduce(ctx.hidden, request, selections)
            reduced.append(rows)
            kept_index.append(index)
            kept_positions.append(_cat_positions([s.positions for s in selections]))
        hidden = _pad(reduced, 0.0)
        token_index = _pad(kept_index, -1)
        positions = _pad_positions([positions[:, b, index] for b, index in enumerate(kept_index)])
        cache.token_index.append(token_index)
        hidden, _, _ = _run_layers(adapter, hidden, positions, token_index, cache, range(cut, num_layers))

    last = (token_index >= 0).sum(dim=1) - 1
    final = adapter.text.norm(hidden[torch.arange(len(requests), device=device), last])
    return PrefillResult(cache, adapter.lm_head(final).float(), kept_positions, sum(selection_times))


def check_request(adapter: ModelAdapter, request: EncodedPrompt, pruning: PruningConfig, shares: list[int]) -> None:
    """Rejects an encoded request that does not fit the model, before any layer runs; ``shares``
    are its images' budgets.

    Requests may come from another process, so nothing about them is taken on trust.
    """
    seq = len(request.input_ids)
    if seq == 0:
        raise ValueError("the prompt is empty")
    if request.positions.shape != (adapter.position_dims, seq):
        raise ValueError(f"positions must have shape ({adapter.position_dims}, {seq}), got {tuple(request.positions.shape)}")
    placeholders = (request.input_ids == adapter.image_token_id).nonzero().flatten().tolist()
    if [p for s in request.spans for p in range(s.start, s.end)] != placeholders:
        raise ValueError("the image spans do not match the prompt's image placeholder tokens")
    if request.image_features.shape != (len(placeholders), adapter.text.config.hidden_size):
        raise ValueError(f"expected {len(placeholders)} vision tokens of width {adapter.text.config.hidden_size}, got {tuple(request.image_features.shape)}")
    if int(request.positions.max()) >= adapter.max_positions:
        raise SettingError(f"the prompt needs {int(request.positions.max()) + 1} positions; the model has {adapter.max_positions}", "images" if len(request.spans) > 1 else "question")
    if pruning.prunes and request.spans and request.spans[-1].end == seq:
        raise ValueError("a pruned prompt must end with text, not with an image")
    if pruning.prunes and pruning.method in GRID_METHODS:
        for span, share in zip(request.spans, shares):
            cells = sum(g.size for g in span.grids)
            if share > cells:
                raise SettingError(f"{pruning.method} keeps grid cells only: an image's share of the budget ({share}) is more than its {cells} cells", pruning.amount_param)


def check_selection(method: str, span: ImageSpan, budget: int, selection: Selection) -> None:
    positions = selection.positions.tolist()
    if len(positions) != budget or positions != sorted(set(positions)):
        raise ValueError(f"pruning method {method!r} must return {budget} distinct sorted positions, got {len(positions)}")
    if positions and not span.start <= positions[0] <= positions[-1] < span.end:
        raise ValueError(f"pruning method {method!r} returned positions outside the image")


def _reduce(hidden: torch.Tensor, request: EncodedPrompt, selections: list[Selection]) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's kept rows of ``hidden`` and their sequence indices: all text, and each span's selection."""
    device = hidden.device
    keep = torch.ones(len(request.input_ids), dtype=torch.bool, device=device)
    for span, selection in zip(request.spans, selections):
        keep[span.start : span.end] = False
        keep[selection.positions.to(device)] = True
    index = keep.nonzero().flatten()
    reduced = hidden[index]
    for span, selection in zip(request.spans, selections):
        if selection.weights is not None:
            slots = torch.searchsorted(index, selection.positions.to(device))
            merged = selection.weights.to(device, torch.float32) @ hidden[span.start : span.end].float()
            reduced[slots] = merged.to(hidden.dtype)
    return reduced, index
