"""Window FastV: FastV's ranking, but the budget is spread over spatial windows of the grid so
that every part of the image keeps some tokens."""

from __future__ import annotations

import torch

from dartserve.pruning.base import ImageSpan, Selection, SelectionContext, stable_top
from dartserve.pruning.config import PruningConfig, split_proportional
from dartserve.pruning.registry import register
from dartserve.pruning.spatial import span_regions

WINDOWS = 16  # a 4 x 4 tiling of a square image; fewer when the budget is smaller


@register("window_fastv", needs_attention=True, grid_cells=True)
def select(ctx: SelectionContext, span: ImageSpan, budget: int, config: PruningConfig) -> Selection:
    scores = ctx.last_attention()[span.start : span.end].cpu()  # one row: cheap to rank window by window on the host
    windows = span_regions(span, min(WINDOWS, budget))
    kept = []
    for window, share in zip(windows, split_proportional(budget, [len(w.cells) for w in windows])):
        cells = torch.tensor(window.cells)
        kept.append(cells[stable_top(scores[cells], share)])
    return Selection(torch.cat(kept).sort().values + span.start)
