"""Attention over the KV pool, called by the stock decoder layers.

The core runs every token of a step through each layer as one packed sequence ``[1, T, d]``:
the projections and the MLP see all requests' tokens at once, and only attention is per
request. transformers picks a layer's attention function by name from the text config
(``AttentionInterface``); dartserve registers its own under ``ATTENTION``. Given a
``pool_step`` (a ``LayerStep`` per layer), it writes the step's new keys and values into their
pool slots and attends each request over its own slots; without one (transformers' own
``generate``) it is SDPA, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dartserve.kv.pool import KVPool

ATTENTION = "dartserve_pool"


@dataclass
class Segment:
    """``count`` rows of one request at ``row`` in the packed sequence, after ``past`` tokens of
    that request already in the layer; ``blocks`` is its block table of the layer, past and new."""

    row: int
    count: int
    past: int
    blocks: torch.Tensor  # [blocks]


class Workspace:
    """Buffers the keys and values a layer gathers from the pool go to, reused from layer to
    layer and step to step: fresh tensors of tens of megabytes would cost page faults each time."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.keys = self.values = pool.keys[:0]

    def gather(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' keys and values, ``[blocks, block_size, kv_heads, head_dim]``."""
        count = blocks.numel()
        if count > len(self.keys):
            shape = (max(count, 2 * len(self.keys)), *self.pool.keys.shape[1:])
            self.keys = self.pool.keys.new_empty(shape)
            self.values = self.pool.values.new_empty(shape)
        keys, values = self.keys[:count], self.values[:count]
        torch.index_select(self.pool.keys, 0, blocks.flatten(), out=keys)
        torch.index_select(self.pool.values, 0, blocks.flatten(), out=values)
        return keys, values


@dataclass
class LayerStep:
    """What one layer needs to attend a step's rows: the first ``decode_count`` rows are single
    tokens after a past, attended together; ``segments`` are the others, one request each."""

    pool: KVPool
    workspace: Workspace
    slots: torch.Tensor  # [T]: the pool slot each row's key and value go to
    decode_count: int
    decode_blocks: torch.Tensor | None  # [decodes, blocks]
    decode_mask: torch.Tensor | None  # [decodes, 1, 1, blocks * block_size]: the slots each decode attends
    segments: list[Segment]


def pool_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, pool_step=None, **kwargs):
    """``query`` ``[1, heads, T, head_dim]``, ``key`` and ``value`` ``[1, kv_heads, T, head_dim]``
    after RoPE; returns ``[1, T, heads, head_dim]`` as transformers' attention functions do."""
    if pool_step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    step: LayerStep = pool_step[module.layer_idx]
    keys, values = step.pool.slot_view()
    keys.index_copy_(0, step.slots, key[0].transpose(0, 1))
    values.index_copy_(0, step.slots, value[0].transpose(0, 1))
    heads, kv_heads = query.shape[1], key.shape[1]
    gqa = heads != kv_heads
    out = query.new_empty(query.shape[2], heads, query.shape[3])  # [T, heads, head_dim]
    if step.decode_count:
        count = step.decode_count
        shape = (count, -1, kv_heads, query.shape[3])
        k, v = step.workspace.gather(step.decode_blocks)
        k, v = k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)  # [decodes, kv_heads, slots, head_dim]
        q = query[0, :, :count].transpose(0, 1)[:, :, None]  # [decodes, heads, 1, head_dim]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=step.decode_mask, scale=scaling, enable_gqa=gqa)
        out[:count] = attended[:, :, 0]
    for seg in step.segments:
        rows = slice(seg.row, seg.row + seg.count)
        q = query[:, :, rows]
        if seg.past == 0:  # a prompt's first chunk: its own keys, causal, no gather
            attended = F.scaled_dot_product_attention(q, key[:, :, rows], value[:, :, rows], is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            total = seg.past + seg.count
            k, v = step.workspace.gather(seg.blocks)
            k = k.view(-1, kv_heads, query.shape[3])[:total].transpose(0, 1)[None]
            v = v.view(-1, kv_heads, query.shape[3])[:total].transpose(0, 1)[None]
            # Query i sits at slot past + i and sees every slot up to its own.
            mask = torch.arange(total, device=q.device)[None] <= torch.arange(seg.past, total, device=q.device)[:, None]
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=scaling, enable_gqa=gqa)
        out[rows] = attended[0].transpose(0, 1)
    return out[None], None


AttentionInterface.register(ATTENTION, pool_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # transformers' own forward builds SDPA masks, as for "sdpa"
