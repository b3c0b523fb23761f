"""Pruning configuration and its validation against a request and a model."""

from __future__ import annotations

import math

from dartserve.checks import SettingError, require_int, require_number
from dartserve.defaults import DEFAULT_PRUNING  # noqa: F401  (where the library's users find it)
from dartserve.pruning.registry import RESERVED, all_settings, method_spec


class PruningConfig:
    """What to prune and where.

    ``budget`` is the number of vision tokens a request keeps over all its images; ``ratio`` is
    the same thing as a fraction of the request's vision tokens (0.111 keeps 64 of 576). Give at
    most one; with neither, every vision token is kept. ``layer`` is K: layers 0..K-1 see the
    full sequence, layers K..L-1 the reduced one; K=0 selects before the LLM, on the projected
    vision tokens, and every layer holds the kept ones only. Any other keyword is a setting of
    the method (``registry.Setting``), read as an attribute (``config.pivot_image``); one the
    method does not declare is an error. Instances are immutable and compare by value.
    """

    __slots__ = ("method", "budget", "ratio", "layer", "settings")

    def __init__(self, method: str = "dart", budget: int | None = None, ratio: float | None = None, layer: int = 2, **settings) -> None:
        if not isinstance(method, str):
            raise ValueError(f"method must be a string, got {method!r}")
        spec = method_spec(method)
        if method == "none":
            given = {"budget": budget, "ratio": ratio, "layer": None if layer == 2 else layer} | settings
            refuse_unread(method, [name for name, value in given.items() if value is not None])
        declared = {s.name: s for s in spec.settings}
        refuse_unread(method, [name for name in settings if name not in declared])
        if budget is not None and ratio is not None:
            raise ValueError("give either budget or ratio, not both")
        if budget is not None:
            require_int("budget", budget, minimum=1)
        if ratio is not None:
            require_number("ratio", ratio)
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"ratio is the fraction of vision tokens kept and must be in (0, 1], got {ratio}")
        require_int("layer", layer, minimum=0)
        if layer == 0 and spec.needs_attention:
            raise ValueError(f"{method} ranks tokens by attention at layer K-1, so it cannot prune before the LLM: use a layer from 1")
        values = {name: settings.get(name, setting.default) for name, setting in declared.items()}
        for name, value in values.items():
            declared[name].check(value)
        for name, value in (("method", method), ("budget", budget), ("ratio", ratio), ("layer", layer), ("settings", values)):
            object.__setattr__(self, name, value)
        if spec.check is not None:
            spec.check(self)

    def __getattr__(self, name: str):
        try:
            return object.__getattribute__(self, "settings")[name]
        except KeyError:
            raise AttributeError(f"pruning method {self.method!r} has no setting {name!r}") from None

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError("a PruningConfig does not change; make another")

    def __reduce__(self):
        return (PruningConfig.from_dict, (self.to_dict(),))

    def _key(self) -> tuple:
        return (self.method, self.budget, self.ratio, self.layer, tuple(sorted(self.settings.items())))

    def __eq__(self, other) -> bool:
        return isinstance(other, PruningConfig) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self.to_dict().items())
        return f"PruningConfig({fields})"

    @classmethod
    def from_dict(cls, data: dict) -> PruningConfig:
        if not isinstance(data, dict):
            raise ValueError(f"pruning must be an object, got {type(data).__name__}")
        unknown = set(data) - {*RESERVED, *all_settings()}
        if unknown:
            raise ValueError(f"unknown pruning fields: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        """The method and the settings it reads: the pruning as applied."""
        if self.method == "none":
            return {"method": "none"}
        return {"method": self.method, "budget": self.budget, "ratio": self.ratio, "layer": self.layer} | self.settings

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
        if self.prunes and not 0 <= self.layer <= num_layers - 1:
            raise SettingError(f"layer K={self.layer} is outside the model's layers: use 0..{num_layers - 1}", "pruning.layer")

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
        spec = method_spec(self.method)
        if self.prunes and spec.grid_cells and 0 in shares:
            raise SettingError(f"{self.method} keeps at least one token per image; a budget of {sum(shares)} leaves an image none", self.amount_param)
        if self.prunes and spec.check_share is not None:
            for share in shares:
                spec.check_share(self, share)
        return shares

    @property
    def amount_param(self) -> str:
        """The request field that sets the amount kept, for errors about it."""
        return "pruning.ratio" if self.ratio is not None else "pruning.budget"


def settings_read_by(method: str) -> tuple[str, ...]:
    """The settings besides ``method`` that pruning method ``method`` reads."""
    if method == "none":
        method_spec(method)
        return ()
    return ("budget", "ratio", "layer", *(s.name for s in method_spec(method).settings))


def refuse_unread(method: str, names) -> None:
    """A ValueError when ``names`` holds a setting ``method`` does not read."""
    read = settings_read_by(method)
    unread = [name for name in names if name not in ("method", *read)]
    if unread:
        raise ValueError(f"pruning method {method!r} does not use {', '.join(unread)}; it reads {', '.join(read) or 'nothing'}")


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
