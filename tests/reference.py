"""An independent reference for pruned inference: the full sequence runs through every layer and
the dropped tokens are masked out of layers >= K, instead of being removed.

It shares only the stock decoder layers and the pruning methods with the engine: positions,
masks, the attention row FastV needs, the cache (transformers' DynamicCache) and decoding are
its own.
"""

from __future__ import annotations

import sys

import torch
from transformers import DynamicCache

from dartserve.models.base import EncodedPrompt, ModelAdapter
from dartserve.pruning.base import SelectionContext
from dartserve.pruning.config import PruningConfig
from dartserve.pruning.registry import get_method


def _attention_row(adapter: ModelAdapter, layer_idx: int, layer_input, cos_sin, mask) -> torch.Tensor:
    """Eager attention probabilities of the whole layer, from which the last row is taken."""
    layer = adapter.layers[layer_idx]
    attn = layer.self_attn
    x = layer.input_layernorm(layer_input)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k = apply_rope(q, k, *cos_sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1)[0, :, -1].mean(dim=0)


@torch.inference_mode()
def masked_reference(adapter: ModelAdapter, request: EncodedPrompt, pruning: PruningConfig, steps: int):
    """Returns (logits per generated position ``[steps + 1, vocab]``, greedy tokens, kept positions, cache)."""
    seq = len(request.input_ids)
    hidden = adapter.embed(request)[None]
    positions = request.positions[:, None, :]
    cos_sin = adapter.rope(hidden, positions)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    cut = pruning.layer if pruning.prunes else adapter.num_layers
    cache = DynamicCache()
    layer_input = hidden
    for i in range(cut):
        layer_input = hidden
        hidden = adapter.layers[i](hidden, attention_mask=causal, position_embeddings=cos_sin, past_key_values=cache, use_cache=True)

    kept = torch.ones(seq, dtype=torch.bool)
    kept_vision = []
    if cut < adapter.num_layers:
        keys = cache.layers[cut - 1].keys[0]
        ctx = SelectionContext(
            hidden=hidden[0],
            normed=adapter.text.norm(hidden[0]),
            keys=keys.transpose(0, 1).reshape(seq, -1),
            last_attention_fn=lambda: _attention_row(adapter, cut - 1, layer_input, cos_sin, causal),
        )
        method = get_method(pruning.method)
        budgets = pruning.span_budgets([s.length for s in request.spans])
        hidden = hidden.clone()
        for span, budget in zip(request.spans, budgets):
            selection = method(ctx, span, budget, pruning)
            kept[span.start : span.end] = False
            kept[selection.positions] = True
            if selection.weights is not None:
                hidden[0, selection.positions] = selection.weights @ ctx.hidden[span.start : span.end]
            kept_vision.append(selection.positions)
    pruned_mask = causal & kept[None, None, None, :]
    for i in range(cut, adapter.num_layers):
        hidden = adapter.layers[i](hidden, attention_mask=pruned_mask, position_embeddings=cos_sin, past_key_values=cache, use_cache=True)

    logits = [adapter.lm_head(adapter.text.norm(hidden[0, -1])).float()]
    tokens = [int(logits[-1].argmax())]
    next_position = int(request.positions.max()) + 1
    for step in range(steps):
        hidden = adapter.text.embed_tokens(torch.tensor([[tokens[-1]]]))
        position = torch.full((positions.shape[0], 1, 1), next_position + step)
        step_cos_sin = adapter.rope(hidden, position)
        keys_seen = torch.cat([kept, torch.ones(step + 1, dtype=torch.bool)])
        for i, layer in enumerate(adapter.layers):
            mask = None if i < cut else keys_seen[None, None, None, :]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=step_cos_sin, past_key_values=cache, use_cache=True)
        logits.append(adapter.lm_head(adapter.text.norm(hidden[0, -1])).float())
        tokens.append(int(logits[-1].argmax()))
    vision = torch.cat(kept_vision).sort().values if kept_vision else torch.empty(0, dtype=torch.long)
    return torch.stack(logits), tokens, vision, kept, cache
