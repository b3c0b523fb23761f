"""FastV: keep the vision tokens the last prompt token attends to most at layer K-1."""

from __future__ import annotations

from dartserve.pruning.base import ImageSpan, Selection, SelectionContext, stable_top
from dartserve.pruning.config import PruningConfig
from dartserve.pruning.registry import register


@register("fastv", needs_attention=True)
def select(ctx: SelectionContext, span: ImageSpan, budget: int, config: PruningConfig) -> Selection:
    scores = ctx.last_attention()[span.start : span.end]
    return Selection(stable_top(scores, budget).sort().values + span.start)
