"""What a pruning method sees and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Grid:
    """A rectangle of vision tokens inside a span: cell (r, c) sits at ``offset + r * stride + c``.

    ``stride`` exceeds ``w`` where the model appends tokens to each row (LLaVA-NeXT's newline).
    """

    offset: int
    h: int
    w: int
    stride: int

    def cell(self, r: int, c: int) -> int:
        return self.offset + r * self.stride + c

    @property
    def size(self) -> int:
        return self.h * self.w


@dataclass(frozen=True)
class ImageSpan:
    """One image's contiguous run of vision tokens, at absolute positions ``start .. start+length-1``."""

    start: int
    length: int
    grids: tuple[Grid, ...]

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class SelectionContext:
    """Layer K-1's view of one request, unpadded.

    ``hidden`` is the residual stream leaving layer K-1 (what layer K would read), ``normed`` the
    same through the model's final norm, ``keys`` layer K-1's post-RoPE keys with heads flattened,
    ``vision`` a bool mask of the request's image tokens, of every image.
    ``last_attention`` computes, on first use only, the head-averaged attention row of the last
    prompt token at layer K-1 over all positions.
    """

    hidden: torch.Tensor
    normed: torch.Tensor
    keys: torch.Tensor
    vision: torch.Tensor
    last_attention_fn: Callable[[], torch.Tensor]
    _last_attention: torch.Tensor | None = field(default=None, repr=False)

    def last_attention(self) -> torch.Tensor:
        if self._last_attention is None:
            self._last_attention = self.last_attention_fn()
        return self._last_attention


@dataclass
class Selection:
    """The tokens one span keeps: sorted absolute ``positions``.

    ``weights`` is ``None`` when the kept tokens are the originals; a method that merges tokens
    (pooling) gives a ``[len(positions), span.length]`` matrix, and kept token i becomes
    ``weights[i] @ hidden[span]`` while taking the position ``positions[i]``.
    """

    positions: torch.Tensor
    weights: torch.Tensor | None = None


def stable_top(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the k best scores; equal scores go to the lower index, so results are reproducible."""
    order = torch.sort(-scores if largest else scores, stable=True).indices
    return order[:k]
