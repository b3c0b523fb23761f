"""The ragged KV cache of a pruned prefill: full length below layer K, reduced from K on."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RaggedKVCache:
    """Per-layer keys and values ``[batch, kv_heads, length_of_layer, head_dim]`` for a batch.

    Layers fall into groups that share one token layout: group 0 holds layers 0..K-1 over the
    full sequence, group 1 layers K..L-1 over the kept tokens (one group when nothing was
    pruned). ``token_index[g][b, j]`` is the sequence index of slot j of request b in group g's
    layers, or -1 for a padding slot of a shorter request; it says which tokens each layer kept.
    ``next_position[b]`` is the rotary position of request b's next token: positions continue
    from the unpruned sequence, so pruning never shifts the text that follows.

    The object is also what transformers' attention modules write to during a forward pass,
    through ``update``, so the stock decoder layers run on it unchanged.
    """

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    layer_group: tuple[int, ...]
    token_index: list[torch.Tensor]
    next_position: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.next_position.shape[0]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Appends a forward pass's new keys and values; returns the layer's whole cache."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def append_tokens(self, index: torch.Tensor) -> None:
        """Records that the next forward pass adds the tokens ``index`` ``[batch, n]`` to every layer."""
        self.token_index = [torch.cat([t, index], dim=1) for t in self.token_index]

    def kept_tokens(self, batch_index: int = 0) -> list[int]:
        """Cached tokens per layer group for one request (padding excluded)."""
        return [int((t[batch_index] >= 0).sum()) for t in self.token_index]

    def select(self, batch_index: int) -> RaggedKVCache:
        """One request's cache, padding slots removed."""
        keep = [t[batch_index] >= 0 for t in self.token_index]
        group = self.layer_group
        return RaggedKVCache(
            keys=[k[batch_index : batch_index + 1, :, keep[group[i]]] for i, k in enumerate(self.keys)],
            values=[v[batch_index : batch_index + 1, :, keep[group[i]]] for i, v in enumerate(self.values)],
            layer_group=group,
            token_index=[t[batch_index : batch_index + 1, m] for t, m in zip(self.token_index, keep)],
            next_position=self.next_position[batch_index : batch_index + 1].clone(),
        )

    def tail(self, count: int) -> RaggedKVCache:
        """The last ``count`` slots of every layer: what decoding added since some earlier point."""
        return RaggedKVCache(
            keys=[k[:, :, k.shape[2] - count :] for k in self.keys],
            values=[v[:, :, v.shape[2] - count :] for v in self.values],
            layer_group=self.layer_group,
            token_index=[t[:, t.shape[1] - count :] for t in self.token_index],
            next_position=self.next_position.clone(),
        )

    @classmethod
    def concat(cls, parts: list[RaggedKVCache]) -> RaggedKVCache:
        """One cache from a prefix and the tails appended to it, in order."""
        return cls(
            keys=[torch.cat([p.keys[i] for p in parts], dim=2) for i in range(len(parts[0].keys))],
            values=[torch.cat([p.values[i] for p in parts], dim=2) for i in range(len(parts[0].values))],
            layer_group=parts[0].layer_group,
            token_index=[torch.cat([p.token_index[g] for p in parts], dim=1) for g in range(len(parts[0].token_index))],
            next_position=parts[-1].next_position.clone(),
        )

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values) if k is not None)
