"""Pruning configuration and its validation against a request and a model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dartserve.checks import SEED_LIMIT, SettingError, require_int, require_number


@dataclass(frozen=True)
class PruningConfig:
    """What to prune and where.

    ``budget`` is the number of vision tokens a request keeps over all its images; ``ratio`` is
    the same thing as a fraction of the request's vision tokens (0.111 keeps 64 of 576). Give at
    most one; with neither, every vision token is kept. ``layer`` is K: layers 0..K-1 see the
    full sequence, layers K..L-1 the reduced one. The other settings belong to the methods that
    read them (``settings_read_by``); giving one a method does not read is an error.
    """

    method: str = "dart"
    budget: int | None = None
    ratio: float | None = None
    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise ValueError(f"method must be a string, got {self.method!r}")
        refuse_unread(self.method, [name for name, default in _DEFAULTS.items() if getattr(self, name) != default])
        if self.budget is not None and self.ratio is not None:
            raise ValueError("give either budget or ratio, not both")
        if self.budget is not None:
            require_int("budget", self.budget, minimum=1)
        if self.ratio is not None:
            require_number("ratio", self.ratio)
            if not 0.0 < self.ratio <= 1.0:
                raise ValueError(f"ratio is the fraction of vision tokens kept and must be in (0, 1], got {self.ratio}")
        # K >= 1: the selection reads layer K-1's keys and output.
        require_int("layer", self.layer, minimum=1)
        require_int("pivot_image", self.pivot_image, minimum=0)
        require_int("pivot_text", self.pivot_text, minimum=0)
        require_int("seed", self.seed, minimum=0, maximum=SEED_LIMIT - 1)
        if self.method == "dart" and self.pivot_image + self.pivot_text < 1:
            raise ValueError("dart needs at least one pivot")

    @classmethod
    def from_dict(cls, data: dict) -> PruningConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown pruning fields: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        """The method and the settings it reads: the pruning as applied."""
        values = asdict(self)
        return {"method": self.method} | {name: values[name] for name in settings_read_by(self.method)}

    def applied(self, num_vision_tokens: int) -> dict:
        """``to_dict`` with the amount as it was applied to a request: the budget in tokens."""
        values = self.to_dict()
        if "budget" in values:
            values["budget"] = self.total_budget(num_vision_tokens)
            del values["ratio"]
        return values

    @property
    def prunes(self) -> bool:
        return self.method != "none" and (self.budget is not None or self.ratio is not None)

    def check_layers(self, num_layers: int) -> None:
        if self.prunes and not 1 <= self.layer <= num_layers - 1:
            raise SettingError(f"layer K={self.layer} is outside the model's layers: use 1..{num_layers - 1}", "pruning.layer")

    def total_budget(self, num_vision_tokens: int) -> int:
        """The number of vision tokens a request with ``num_vision_tokens`` keeps."""
        if not self.prunes or num_vision_tokens == 0:
            return num_vision_tokens
        if self.budget is not None:
            budget = self.budget
        else:
            budget = max(1, math.floor(self.ratio * num_vision_tokens + 0.5))  # halves round up, always
        if budget > num_vision_tokens:
            raise SettingError(f"budget {budget} is larger than the request's {num_vision_tokens} vision tokens", self.amount_param)
        return budget

    def span_budgets(self, span_lengths: list[int]) -> list[int]:
        """Splits the request's budget over its images in proportion to their token counts."""
        shares = split_proportional(self.total_budget(sum(span_lengths)), span_lengths)
        if self.prunes and self.method in GRID_METHODS and 0 in shares:
            raise SettingError(f"{self.method} keeps at least one token per image; a budget of {sum(shares)} leaves an image none", self.amount_param)
        if self.prunes and self.method == "dart":
            for share in shares:
                if share < self.pivot_image:
                    raise SettingError(f"an image's share of the budget ({share}) is smaller than pivot_image={self.pivot_image}", self.amount_param)
        return shares

    @property
    def amount_param(self) -> str:
        """The request field that sets the amount kept, for errors about it."""
        return "pruning.ratio" if self.ratio is not None else "pruning.budget"


def settings_read_by(method: str) -> tuple[str, ...]:
    """The settings besides ``method`` that pruning method ``method`` reads."""
    from dartserve.pruning.registry import method_settings

    extra = method_settings(method)
    return () if method == "none" else ("budget", "ratio", "layer", *extra)


def refuse_unread(method: str, names) -> None:
    """A ValueError when ``names`` holds a setting ``method`` does not read."""
    read = settings_read_by(method)
    unread = [name for name in names if name not in ("method", *read)]
    if unread:
        raise ValueError(f"pruning method {method!r} does not use {', '.join(unread)}; it reads {', '.join(read) or 'nothing'}")


GRID_METHODS = ("pooling", "window_fastv")  # they keep grid cells, never LLaVA-NeXT's row separators
_DEFAULTS = {name: f.default for name, f in PruningConfig.__dataclass_fields__.items()}


def split_proportional(total: int, sizes: list[int]) -> list[int]:
    """Largest-remainder split of ``total`` over ``sizes``; ties go to the earlier entry.

    No share exceeds its size as long as ``total <= sum(sizes)``.
    """
    whole = sum(sizes)
    if total > whole:
        raise ValueError(f"cannot keep {total} of {whole} tokens")
    if whole == 0:
        return [0] * len(sizes)
    shares = [total * s // whole for s in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-(total * sizes[i] % whole), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares
