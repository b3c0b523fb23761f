"""Random pruning: a seeded, reproducible uniform sample of each image's tokens."""

from __future__ import annotations

import torch

from dartserve.checks import SEED_LIMIT
from dartserve.pruning.base import ImageSpan, Selection, SelectionContext
from dartserve.pruning.config import PruningConfig
from dartserve.pruning.registry import Setting, register


@register("random", settings=(Setting("seed", int, 0, "seeds the sample: the same seed keeps the same tokens", minimum=0, maximum=SEED_LIMIT - 1),))
def select(ctx: SelectionContext, span: ImageSpan, budget: int, config: PruningConfig) -> Selection:
    # Seeded by the config and the span's place, so a request gives the same tokens alone or in a batch.
    generator = torch.Generator().manual_seed((config.seed * 1_000_003 + span.start) % SEED_LIMIT)
    chosen = torch.randperm(span.length, generator=generator)[:budget]
    return Selection(chosen.sort().values + span.start)
