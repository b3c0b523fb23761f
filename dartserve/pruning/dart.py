"""DART: keep the vision tokens least duplicated by a few pivot tokens (Wen et al., 2025)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dartserve.checks import SettingError, require_int
from dartserve.pruning.base import ImageSpan, Selection, SelectionContext, stable_top
from dartserve.pruning.config import PruningConfig
from dartserve.pruning.registry import Setting, register


def dart_select(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    image_start: int,
    image_len: int,
    budget: int,
    pivot_image: int = 4,
    pivot_text: int = 4,
    text: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted absolute positions of the ``budget`` image tokens DART keeps.

    ``hidden`` is layer K-1's output through the final norm ``[seq, d]``; ``keys`` layer K-1's
    post-RoPE keys ``[seq, kv_dim]``. Pivots are the ``pivot_image`` image tokens and the
    ``pivot_text`` text tokens after the image with the largest L1 key norm; ``text`` (bool
    ``[seq]``) marks the text tokens where a prompt holds other images, whose tokens are not
    text, and by default every token after the image counts as text. Image pivots are kept;
    text pivots only guide. The ``budget - pivot_image`` other slots are split evenly over the
    pivots (remainder to the first); pivots, in ascending position, each claim the candidates
    least cosine-similar to them, which then leave the pool.
    """
    seq = hidden.shape[0]
    if keys.shape[0] != seq:
        raise ValueError(f"hidden has {seq} positions but keys have {keys.shape[0]}")
    if image_len < 1 or image_start < 0 or image_start + image_len > seq:
        raise ValueError(f"image span [{image_start}, {image_start + image_len}) is outside the sequence of {seq}")
    require_int("pivot_image", pivot_image, minimum=0)
    require_int("pivot_text", pivot_text, minimum=0)
    require_int("budget", budget, minimum=0)
    if not pivot_image <= budget <= image_len:
        raise ValueError(f"budget must be in [pivot_image={pivot_image}, {image_len}], got {budget}")
    image_end = image_start + image_len

    after = torch.arange(image_end, seq, device=keys.device)
    if text is not None:
        if text.shape != (seq,) or text.dtype != torch.bool:
            raise ValueError(f"text must be a bool mask of shape ({seq},), got {text.dtype} {tuple(text.shape)}")
        after = after[text[image_end:]]

    key_norm = keys.float().abs().sum(dim=-1)
    image_pivots = stable_top(key_norm[image_start:image_end], pivot_image)
    text_pivots = after[stable_top(key_norm[after], min(pivot_text, len(after)))] - image_start
    pivots = torch.cat([image_pivots, text_pivots]).sort().values  # offsets from image_start
    if len(pivots) == 0:
        raise ValueError("dart needs at least one pivot")

    unit = F.normalize(hidden.float(), dim=-1)
    image_unit = unit[image_start:image_end]
    free = torch.ones(image_len, dtype=torch.bool, device=hidden.device)
    free[image_pivots] = False
    share, extra = divmod(budget - pivot_image, len(pivots))
    claimed = [image_pivots]
    for i, pivot in enumerate(pivots.tolist()):
        take = share + (i < extra)
        if take == 0:
            continue
        similarity = image_unit @ unit[image_start + pivot]
        similarity[~free] = float("inf")
        chosen = stable_top(similarity, take, largest=False)
        free[chosen] = False
        claimed.append(chosen)
    return (torch.cat(claimed).sort().values + image_start).to(torch.long)


def _check(config: PruningConfig) -> None:
    if config.pivot_image + config.pivot_text < 1:
        raise ValueError("dart needs at least one pivot")


def _check_share(config: PruningConfig, share: int) -> None:
    if share < config.pivot_image:
        raise SettingError(f"an image's share of the budget ({share}) is smaller than pivot_image={config.pivot_image}", config.amount_param)


SETTINGS = (
    Setting("pivot_image", int, 4, "image tokens with the largest key norms taken as pivots; they are kept", minimum=0),
    Setting("pivot_text", int, 4, "text tokens after the image with the largest key norms taken as pivots; they only guide", minimum=0),
)


@register("dart", settings=SETTINGS, check=_check, check_share=_check_share)
def select(ctx: SelectionContext, span: ImageSpan, budget: int, config: PruningConfig) -> Selection:
    positions = dart_select(
        ctx.normed, ctx.keys, span.start, span.length, budget, config.pivot_image, config.pivot_text, text=~ctx.vision
    )
    return Selection(positions)
