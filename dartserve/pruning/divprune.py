"""DivPrune: keep the most diverse vision tokens, by greedy max-min selection (Alvar et al., CVPR 2025)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dartserve.checks import require_int
from dartserve.pruning.base import ImageSpan, Selection, SelectionContext
from dartserve.pruning.config import PruningConfig
from dartserve.pruning.registry import register


def divprune_select(features: torch.Tensor, budget: int) -> torch.Tensor:
    """Sorted positions (0..n-1) of the ``budget`` rows of ``features`` ``[n, d]`` DivPrune keeps.

    Distance is 1 - cosine similarity. The first token is the one whose nearest neighbour is
    farthest; each next one is the token, among those not yet kept, whose smallest distance to
    the kept ones is largest. Ties go to the lowest position.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [n, d], got shape {tuple(features.shape)}")
    n = features.shape[0]
    require_int("budget", budget, minimum=0)
    if budget > n:
        raise ValueError(f"budget {budget} is more than the {n} tokens")
    if budget == 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    unit = F.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.T  # [n, n]
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    # The published code takes each token's second smallest distance: the smallest is its own (0).
    nearest = distance.topk(2, dim=0, largest=False).values[1]
    chosen = [int(nearest.argmax())]  # argmax gives the first of equal maxima
    closest = distance[chosen[0]].clone()
    for _ in range(budget - 1):
        closest[chosen] = -float("inf")  # a kept token is not taken again, even where duplicates tie at 0
        pick = int(closest.argmax())
        chosen.append(pick)
        closest = torch.minimum(closest, distance[pick])
    return torch.tensor(sorted(chosen), dtype=torch.long, device=features.device)


@register("divprune")
def select(ctx: SelectionContext, span: ImageSpan, budget: int, config: PruningConfig) -> Selection:
    return Selection(divprune_select(ctx.normed[span.start : span.end], budget) + span.start)
