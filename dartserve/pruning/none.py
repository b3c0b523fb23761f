"""No pruning: every vision token is kept."""

from __future__ import annotations

import torch

from dartserve.pruning.base import ImageSpan, Selection, SelectionContext
from dartserve.pruning.config import PruningConfig
from dartserve.pruning.registry import register


@register("none")
def select(ctx: SelectionContext, span: ImageSpan, budget: int, config: PruningConfig) -> Selection:
    return Selection(torch.arange(span.start, span.end))
