"""Block tables of the requests in the pool, and the finished turns kept there for reuse.

A request's layers get blocks separately, since the layers from K on of a pruned request hold
fewer tokens; the layers of one group always hold the same number. A finished request whose
caller asked to keep it (a conversation's turn) stays resident under a key until a later turn
adopts its blocks or the pool needs them: then the least recently kept goes first.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from dartserve.engine.requests import Layout, RequestState
from dartserve.kv.pool import KVPool


class KVCacheManager:
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.resident: OrderedDict[str, Layout] = OrderedDict()

    def blocks_for(self, layout: Layout, lengths: list[int]) -> int:
        """New blocks ``layout`` needs to hold ``lengths`` tokens per group."""
        size = self.pool.block_size
        return sum(max(0, math.ceil(n / size) - have) for n, have in zip(layout.layer_lengths(lengths), layout.counts))

    def grow(self, layout: Layout, lengths: list[int]) -> bool:
        """Gives ``layout`` the blocks to hold ``lengths`` tokens per group, evicting kept turns
        when the pool is short; False, with nothing allocated, when that is not enough."""
        needed = self.blocks_for(layout, lengths)
        while needed > self.pool.num_free:
            if not self.evict_one():
                return False
        if needed:
            size = self.pool.block_size
            blocks = iter(self.pool.allocate(needed))
            for layer, n in enumerate(layout.layer_lengths(lengths)):
                want = math.ceil(n / size)
                if want > layout.counts[layer]:
                    _ensure_capacity(layout, want)
                    layout.tables[layer, layout.counts[layer] : want] = torch.tensor([next(blocks) for _ in range(want - layout.counts[layer])])
                    layout.counts[layer] = want
        return True

    def free(self, layout: Layout) -> None:
        """Returns the blocks to the pool; their contents stay until reused, so a preempted
        request's cache can still be copied out before the step writes anything."""
        self.pool.release(layout.blocks())
        layout.counts = [0] * layout.num_layers  # freed once only

    def keep(self, key: str, layout: Layout) -> None:
        """Keeps a finished request's blocks under ``key``; an older entry of that key goes."""
        old = self.resident.pop(key, None)
        if old is not None:
            self.free(old)
        self.resident[key] = layout

    def adopt(self, key: str, state: RequestState) -> bool:
        """Gives ``state`` the blocks kept under ``key``; False when they are not resident."""
        layout = self.resident.pop(key, None)
        if layout is None:
            return False
        state.layout = layout
        return True

    def evict_one(self) -> bool:
        if not self.resident:
            return False
        _, layout = self.resident.popitem(last=False)
        self.free(layout)
        return True

    @property
    def resident_blocks(self) -> int:
        return sum(sum(layout.counts) for layout in self.resident.values())


def _ensure_capacity(layout: Layout, blocks: int) -> None:
    capacity = layout.tables.shape[1]
    if blocks > capacity:
        grown = torch.zeros(layout.num_layers, max(blocks, 2 * capacity), dtype=torch.long)
        grown[:, :capacity] = layout.tables
        layout.tables = grown


def check_fits(pool: KVPool, layout: Layout, lengths: list[int]) -> None:
    """A ValueError when ``lengths`` tokens per group could never fit the pool, even empty."""
    size = pool.block_size
    needed = sum(math.ceil(n / size) for n in layout.layer_lengths(lengths))
    if needed > pool.num_blocks:
        raise ValueError(f"the request needs {needed} KV blocks of {size} tokens; the pool has {pool.num_blocks} in all (kv_cache_mb)")
