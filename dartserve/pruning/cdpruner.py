"""CDPruner: keep the vision tokens that maximise a conditional DPP's determinant (Zhang et al., NeurIPS 2025).

The kernel ``L[i, j] = r_i * cos(x_i, x_j) * r_j`` weighs the tokens' similarity by each one's
relevance ``r`` to the question, and the fast greedy MAP inference of the DPP (Chen et al.,
2018) picks, one token at a time, the one that grows ``log det L[S, S]`` most: diverse tokens
that matter to the question. The paper takes relevance from CLIP's text tower; dartserve has
the question in the language model, so relevance is the mean cosine similarity of a vision
token's state to the question's (the text after the image), at the selection layer: their
input embeddings at layer 0, layer K-1's output (through the final norm) at K.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dartserve.checks import require_int
from dartserve.pruning.base import ImageSpan, Selection, SelectionContext
from dartserve.pruning.config import PruningConfig
from dartserve.pruning.registry import Setting, register

RANK_SPENT = 1e-9  # a gain this small against the largest kernel value is rounding, not a direction

def relevance_scores(image: torch.Tensor, question: torch.Tensor, weight: float) -> torch.Tensor:
    """Each image row's relevance to the ``question`` rows, scaled to (0, 1] and weighted as the
    paper's theta does: ``exp(theta / (2 (1 - theta)) * r)``; theta 0 leaves diversity alone."""
    if not len(question):
        return torch.ones(len(image), device=image.device)
    similarity = (F.normalize(image.float(), dim=-1) @ F.normalize(question.float(), dim=-1).T).mean(dim=-1)
    spread = similarity.max() - similarity.min()
    scaled = (similarity - similarity.min() + 1e-6) / (spread if spread > 0 else 1.0)
    return torch.exp(weight / (2 * (1 - weight)) * scaled)


def greedy_map(kernel: torch.Tensor, budget: int) -> torch.Tensor:
    """Positions the fast greedy MAP inference of a DPP with ``kernel`` ``[n, n]`` picks, in the
    order picked: each step takes the item with the largest marginal gain of ``log det``, kept
    up to date by an incremental Cholesky factor. Ties go to the lowest position. Once no item
    can grow the determinant (the kernel's rank is spent: a budget above the states' width),
    the rest are taken by their own kernel value, largest first."""
    n = kernel.shape[0]
    require_int("budget", budget, minimum=0)
    if budget > n:
        raise ValueError(f"budget {budget} is more than the {n} tokens")
    kernel = kernel.double()
    factors = kernel.new_zeros(budget, n)  # rows of the Cholesky factor, one per pick
    gains = kernel.diagonal().clone()  # d_i^2: det growth of adding i
    picked = []
    for step in range(budget):
        j = int(gains.argmax())
        if gains[j] <= RANK_SPENT * kernel.diagonal().max():
            rest = torch.ones(n, dtype=torch.bool)
            rest[picked] = False
            order = torch.sort(-kernel.diagonal().cpu(), stable=True).indices
            picked += [int(i) for i in order if rest[i]][: budget - step]
            break
        picked.append(j)
        e = (kernel[j] - factors[:step, j] @ factors[:step]) / math.sqrt(float(gains[j]))
        factors[step] = e
        gains -= e.square()
        gains[picked] = -float("inf")
    return torch.tensor(picked, dtype=torch.long, device=kernel.device)


RELEVANCE_WEIGHT = Setting(
    "relevance_weight", float, 0.5, "theta: how much relevance to the question weighs against diversity (0: diversity alone)", minimum=0.0, below=1.0
)


@register("cdpruner", settings=(RELEVANCE_WEIGHT,))
def select(ctx: SelectionContext, span: ImageSpan, budget: int, config: PruningConfig) -> Selection:
    image = ctx.normed[span.start : span.end]
    after = torch.arange(span.end, len(ctx.normed), device=ctx.normed.device)
    question = ctx.normed[after[~ctx.vision[span.end :]]]
    unit = F.normalize(image.float(), dim=-1)
    relevance = relevance_scores(image, question, config.relevance_weight)
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    return Selection(greedy_map(kernel, budget).sort().values + span.start)
