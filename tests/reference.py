"""An independent reference for pruned inference: the full sequence runs through every layer and
the dropped tokens are masked out of layers >= K, instead of being removed.

It shares only the stock decoder layers and the pruning methods other than DART with the
engine: positions, masks, the attention row FastV needs, DART's selection, the cache
(transformers' DynamicCache) and decoding are its own.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from dartserve.models.base import EncodedPrompt, ModelAdapter
from dartserve.pruning.base import Selection, SelectionContext
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


def dart_reference(normed: torch.Tensor, keys: torch.Tensor, span, budget: int, vision: set[int], pivot_image: int, pivot_text: int) -> list[int]:
    """DART as the paper and DESIGN.md state it, token by token: pivots by the L1 norm of the
    keys (image pivots kept; text pivots from the text after the image), then each pivot in
    turn claims its share of the free image tokens least cosine-similar to it."""
    norm = keys.float().abs().sum(dim=-1).tolist()
    by_norm = lambda candidates: sorted(candidates, key=lambda p: (-norm[p], p))  # noqa: E731
    image = range(span.start, span.start + span.length)
    image_pivots = by_norm(image)[:pivot_image]
    text_pivots = by_norm(p for p in range(image.stop, len(norm)) if p not in vision)[:pivot_text]
    unit = F.normalize(normed.float(), dim=-1)
    kept, free = list(image_pivots), [p for p in image if p not in image_pivots]
    pivots = sorted(image_pivots + text_pivots)
    share, extra = divmod(budget - pivot_image, len(pivots))
    for i, pivot in enumerate(pivots):
        similarity = (unit[span.start : image.stop] @ unit[pivot]).tolist()
        claimed = sorted(free, key=lambda p: (similarity[p - span.start], p))[: share + (i < extra)]
        kept += claimed
        free = [p for p in free if p not in claimed]
    return sorted(kept)


@torch.inference_mode()
def masked_reference(adapter: ModelAdapter, request: EncodedPrompt, pruning: PruningConfig, steps: int, forced: list[int] = ()):
    """Returns (logits per generated position ``[len(forced) + steps + 1, vocab]``, greedy tokens,
    kept positions, the kept-token mask, cache). ``forced`` are fed after the prompt in place of
    the greedy picks (a conversation's earlier answer and next turn); greedy decoding follows."""
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
        vision = {p for span in request.spans for p in range(span.start, span.start + span.length)}
        vision_mask = torch.tensor([p in vision for p in range(seq)])
        if cut == 0:  # before the LLM: the embeddings stand in for the states and the keys
            ctx = SelectionContext(hidden=hidden[0], normed=hidden[0], keys=hidden[0], vision=vision_mask, last_attention_fn=None)
        else:
            keys = cache.layers[cut - 1].keys[0]
            ctx = SelectionContext(
                hidden=hidden[0],
                normed=adapter.text.norm(hidden[0]),
                keys=keys.transpose(0, 1).reshape(seq, -1),
                vision=vision_mask,
                last_attention_fn=lambda: _attention_row(adapter, cut - 1, layer_input, cos_sin, causal),
            )
        method = get_method(pruning.method)
        budgets = pruning.span_budgets([s.length for s in request.spans])
        hidden = hidden.clone()
        for span, budget in zip(request.spans, budgets):
            if pruning.method == "dart":
                chosen = dart_reference(ctx.normed, ctx.keys, span, budget, vision, pruning.pivot_image, pruning.pivot_text)
                selection = Selection(torch.tensor(chosen, dtype=torch.long))
            else:
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
    for step in range(len(forced) + steps):
        fed = forced[step] if step < len(forced) else tokens[-1]
        hidden = adapter.text.embed_tokens(torch.tensor([[fed]]))
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
