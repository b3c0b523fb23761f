"""The attention row of the last prompt token, which FastV ranks vision tokens by."""

from __future__ import annotations

import torch


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
