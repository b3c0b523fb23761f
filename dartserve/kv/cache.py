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

    It is how a request's cache leaves the engine core's KV pool and comes back to it
    (``CoreRequest.cache``, ``RequestOutput.cache``), and what the codec turns into bytes.
    """

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    layer_group: tuple[int, ...]
    token_index: list[torch.Tensor]
    next_position: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.next_position.shape[0]

    def kept_tokens(self, batch_index: int = 0) -> list[int]:
        """Cached tokens per layer group for one request (padding excluded)."""
        return [int((t[batch_index] >= 0).sum()) for t in self.token_index]

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
