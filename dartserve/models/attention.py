"""Attention masks over the slots of a (possibly padded, possibly pruned) cache."""

from __future__ import annotations

import torch


def attention_mask(token_index: torch.Tensor, query_len: int) -> torch.Tensor | None:
    """Boolean mask ``[batch, 1, query_len, slots]`` for queries in the last ``query_len`` slots.

    A query sees the slots at or before its own that hold a token (``token_index >= 0``); slot
    order is sequence order, also after pruning. ``None`` when nothing is padding: SDPA then
    runs its causal kernels (flash/memory-efficient) with no mask at all.
    """
    valid = token_index >= 0
    if bool(valid.all()):
        return None
    slots = token_index.shape[1]
    query_slots = torch.arange(slots - query_len, slots, device=token_index.device)
    causal = torch.arange(slots, device=token_index.device)[None, :] <= query_slots[:, None]
    return (causal[None] & valid[:, None, :])[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def last_token_attention(layer, hidden_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The head-averaged attention row of one query over ``keys`` ``[kv_heads, n, head_dim]``.

    Recomputes just that query from the layer's input (``hidden_in`` ``[hidden]``), so the full
    attention matrix is never formed and the prefill itself keeps using fused kernels.
    """
    attn = layer.self_attn
    query = attn.q_proj(layer.input_layernorm(hidden_in)).view(-1, attn.head_dim)
    query = query * cos + rotate_half(query) * sin
    keys = keys.repeat_interleave(query.shape[0] // keys.shape[0], dim=0)
    scores = torch.einsum("hd,hnd->hn", query.float(), keys.float()) * attn.scaling
    return torch.softmax(scores, dim=-1).mean(dim=0)
