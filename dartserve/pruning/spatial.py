"""Splitting an image's token grids into contiguous rectangular regions."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dartserve.pruning.base import Grid, ImageSpan
from dartserve.pruning.config import split_proportional


@dataclass(frozen=True)
class Region:
    """A rectangle of a span's grid: its cells and its centre cell, as offsets into the span."""

    cells: list[int]
    centre: int


def grid_regions(h: int, w: int, n: int) -> list[tuple[range, range]]:
    """Partitions an h x w grid into exactly n non-empty rectangles (rows, cols) of near-equal size.

    Rows are cut into bands (about sqrt(n * h / w) of them, so regions come out near square) and
    each band into columns; bands take n // bands regions each, the first ones one more.
    Regions are listed row-major.
    """
    if not 1 <= n <= h * w:
        raise ValueError(f"cannot cut a {h}x{w} grid into {n} regions")
    bands = min(h, n, max(1, round(math.sqrt(n * h / w))))
    while math.ceil(n / bands) > w:
        bands += 1
    per_band, extra = divmod(n, bands)
    regions = []
    for b in range(bands):
        cols = per_band + (b < extra)
        rows = range(b * h // bands, (b + 1) * h // bands)
        regions += [(rows, range(c * w // cols, (c + 1) * w // cols)) for c in range(cols)]
    return regions


def span_regions(span: ImageSpan, n: int) -> list[Region]:
    """Cuts a span's grids into n regions in total, shared in proportion to grid size.

    Tokens outside every grid (LLaVA-NeXT's row separators) belong to no region.
    """
    cells = sum(g.size for g in span.grids)
    if n > cells:
        raise ValueError(f"budget {n} exceeds the {cells} grid cells of an image")
    regions = []
    for grid, share in zip(span.grids, split_proportional(n, [g.size for g in span.grids])):
        if share == 0:
            continue
        for rows, cols in grid_regions(grid.h, grid.w, share):
            centre = grid.cell(rows[(len(rows) - 1) // 2], cols[(len(cols) - 1) // 2])
            regions.append(Region([grid.cell(r, c) for r in rows for c in cols], centre))
    return regions


def square_grid(length: int) -> tuple[Grid, ...]:
    """The grid of a model that lays an image out as side x side tokens (LLaVA-1.5)."""
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"{length} vision tokens do not form a square grid")
    return (Grid(0, side, side, side),)
