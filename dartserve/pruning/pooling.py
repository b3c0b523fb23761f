"""Pooling: average the image grid down to the budget, one token per rectangular region.

Each pooled token is the mean of its region's hidden states (the residual stream entering layer
K) and takes the position (1-D, or M-RoPE's 3-D) of the region's centre cell: the cell at the
middle row and middle column, rounding towards the top-left. Pooled tokens stay in raster order.
"""

from __future__ import annotations

import torch

from dartserve.pruning.base import ImageSpan, Selection, SelectionContext
from dartserve.pruning.config import PruningConfig
from dartserve.pruning.registry import register
from dartserve.pruning.spatial import span_regions


@register("pooling", grid_cells=True)
def select(ctx: SelectionContext, span: ImageSpan, budget: int, config: PruningConfig) -> Selection:
    regions = sorted(span_regions(span, budget), key=lambda region: region.centre)
    weights = torch.zeros(budget, span.length)
    for i, region in enumerate(regions):
        weights[i, region.cells] = 1.0 / len(region.cells)
    positions = torch.tensor([region.centre for region in regions]) + span.start
    return Selection(positions, weights)
