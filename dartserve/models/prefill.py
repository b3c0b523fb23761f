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
from dartserve.models.selection import check_request, check_selection, reduce_rows
from dartserve.pruning.base import SelectionContext
from dartserve.pruning.config import PruningConfig
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
    if pruning.prunes and pruning.layer == 0:
        raise ValueError("pruning before the LLM (layer 0) runs in the engine core (dartserve.engine)")
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
            rows, index = reduce_rows(ctx.hidden, request, selections)
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
