"""The KV memory pool: keys and values of every layer in one preallocated arena of blocks.

A block holds ``block_size`` token slots of one layer. Blocks are not tied to a layer, so a
pruned request, whose layers from K on hold a fraction of its prompt, takes a fraction of the
blocks, and the pool holds more requests at once. Block 0 is never handed out: the padding of
a gathered block table points at it, and attention masks it out.
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK_SIZE = 16
CPU_DEFAULT_MB = 2048
CUDA_FREE_SHARE = 0.8  # of the device memory free once the weights are loaded; the rest is for activations


class PoolExhausted(Exception):
    """Not enough free blocks for an allocation: the caller waits, evicts or preempts."""


class KVPool:
    def __init__(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of at least one slot, got {num_blocks} blocks of {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks + 1, block_size, kv_heads, head_dim)
        # Uninitialised: a block is zeroed when first handed out (``_fresh``), so the memory the
        # pool takes grows with its peak use, and the slots attention masks out are never NaN.
        # Never inference tensors, which only inference mode may write to, even when made in it.
        with torch.inference_mode(False):
            self.keys = torch.empty(shape, dtype=dtype, device=device)
            self.values = torch.empty(shape, dtype=dtype, device=device)
            self.keys[0] = 0
            self.values[0] = 0
        self._free: list[int] = []
        self._fresh = 1  # blocks from here on were never handed out
        self.peak_used = 0

    @staticmethod
    def block_bytes(block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * block_size * kv_heads * head_dim * dtype.itemsize

    @property
    def num_free(self) -> int:
        return len(self._free) + self.num_blocks + 1 - self._fresh

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def slot_bytes(self) -> int:
        """One token's keys and values in one layer."""
        return 2 * self.keys[0, 0].nbytes

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise PoolExhausted(f"{count} blocks wanted, {self.num_free} free")
        taken = [self._free.pop() for _ in range(min(count, len(self._free)))]
        if len(taken) < count:
            new = range(self._fresh, self._fresh + count - len(taken))
            self.keys[new.start : new.stop] = 0
            self.values[new.start : new.stop] = 0
            self._fresh = new.stop
            taken += new
        self.peak_used = max(self.peak_used, self.num_used)
        return taken

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    def slot_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as ``[slots, kv_heads, head_dim]``, slot = block * block_size + offset."""
        return self.keys.view(-1, *self.keys.shape[2:]), self.values.view(-1, *self.values.shape[2:])


def pool_blocks(kv_cache_mb: float | None, block_bytes: int, device: torch.device) -> int:
    """How many blocks ``kv_cache_mb`` holds; without a setting, a share of the free CUDA memory,
    or ``CPU_DEFAULT_MB`` on the CPU."""
    if kv_cache_mb is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free * CUDA_FREE_SHARE
        else:
            budget = CPU_DEFAULT_MB * 2**20
    else:
        if isinstance(kv_cache_mb, bool) or not isinstance(kv_cache_mb, (int, float)) or not kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be a positive number of megabytes, got {kv_cache_mb!r}")
        budget = kv_cache_mb * 2**20
    blocks = int(budget // block_bytes) - 1  # one block is the padding block
    if blocks < 1:
        raise ValueError(f"kv_cache_mb={kv_cache_mb} holds no block of {block_bytes} bytes")
    return blocks
