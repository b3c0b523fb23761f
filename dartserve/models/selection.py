"""Checks of a request against the model and its pruning, and what a selection does to its rows."""

from __future__ import annotations

import torch

from dartserve.checks import SettingError
from dartserve.models.base import EncodedPrompt, ModelAdapter
from dartserve.pruning.base import ImageSpan, Selection
from dartserve.pruning.config import PruningConfig
from dartserve.pruning.registry import method_spec


def check_request(adapter: ModelAdapter, request: EncodedPrompt, pruning: PruningConfig, shares: list[int]) -> None:
    """Rejects an encoded request that does not fit the model, before any layer runs; ``shares``
    are its images' budgets.

    Requests may come from another process, so nothing about them is taken on trust.
    """
    seq = len(request.input_ids)
    if seq == 0:
        raise ValueError("the prompt is empty")
    if request.positions.shape != (adapter.position_dims, seq):
        raise ValueError(f"positions must have shape ({adapter.position_dims}, {seq}), got {tuple(request.positions.shape)}")
    placeholders = (request.input_ids == adapter.image_token_id).nonzero().flatten().tolist()
    if [p for s in request.spans for p in range(s.start, s.end)] != placeholders:
        raise ValueError("the image spans do not match the prompt's image placeholder tokens")
    if request.image_features.shape != (len(placeholders), adapter.text.config.hidden_size):
        raise ValueError(f"expected {len(placeholders)} vision tokens of width {adapter.text.config.hidden_size}, got {tuple(request.image_features.shape)}")
    if int(request.positions.max()) >= adapter.max_positions:
        raise SettingError(f"the prompt needs {int(request.positions.max()) + 1} positions; the model has {adapter.max_positions}", "images" if len(request.spans) > 1 else "question")
    if pruning.prunes and request.spans and request.spans[-1].end == seq:
        raise ValueError("a pruned prompt must end with text, not with an image")
    if pruning.prunes and method_spec(pruning.method).grid_cells:
        for span, share in zip(request.spans, shares):
            cells = sum(g.size for g in span.grids)
            if share > cells:
                raise SettingError(f"{pruning.method} keeps grid cells only: an image's share of the budget ({share}) is more than its {cells} cells", pruning.amount_param)


def check_selection(method: str, span: ImageSpan, budget: int, selection: Selection) -> None:
    positions = selection.positions.tolist()
    if len(positions) != budget or positions != sorted(set(positions)):
        raise ValueError(f"pruning method {method!r} must return {budget} distinct sorted positions, got {len(positions)}")
    if positions and not span.start <= positions[0] <= positions[-1] < span.end:
        raise ValueError(f"pruning method {method!r} returned positions outside the image")


def reduce_rows(hidden: torch.Tensor, request: EncodedPrompt, selections: list[Selection]) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's kept rows of ``hidden`` and their sequence indices: all text, and each span's selection."""
    device = hidden.device
    keep = torch.ones(len(request.input_ids), dtype=torch.bool, device=device)
    for span, selection in zip(request.spans, selections):
        keep[span.start : span.end] = False
        keep[selection.positions.to(device)] = True
    index = keep.nonzero().flatten()
    reduced = hidden[index]
    for span, selection in zip(request.spans, selections):
        if selection.weights is not None:
            slots = torch.searchsorted(index, selection.positions.to(device))
            merged = selection.weights.to(device, torch.float32) @ hidden[span.start : span.end].float()
            reduced[slots] = merged.to(hidden.dtype)
    return reduced, index
