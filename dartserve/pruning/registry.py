"""Pruning methods by name, each with what it declares where it is registered.

A method is a function ``select(ctx, span, budget, config) -> Selection``; registering one
touches no model code. Every method but ``none`` reads the amount (``budget`` or ``ratio``) and
the layer K; the settings it reads beyond them it declares (``Setting``: name, type, default,
bounds, help), and from that declaration come ``PruningConfig``'s checks, the APIs' schemas
and the documentation's table: a new method with a setting is one new file. A request that
sets a setting its method does not read is refused, not silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from dartserve.checks import require_int, require_number

if TYPE_CHECKING:
    from dartserve.pruning.base import ImageSpan, Selection, SelectionContext
    from dartserve.pruning.config import PruningConfig

    Method = Callable[[SelectionContext, ImageSpan, int, PruningConfig], Selection]


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type  # int or float
    default: int | float
    help: str
    minimum: int | float | None = None
    maximum: int | float | None = None
    below: float | None = None  # an exclusive upper bound

    def check(self, value) -> None:
        if self.kind is int:
            require_int(self.name, value, self.minimum, self.maximum)
            return
        require_number(self.name, value)
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.name} must be at least {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{self.name} must be at most {self.maximum}, got {value}")
        if self.below is not None and not value < self.below:
            raise ValueError(f"{self.name} must be below {self.below}, got {value}")

    def json_schema(self) -> dict:
        schema = {"type": "integer" if self.kind is int else "number", "default": self.default, "description": self.help}
        bounds = {"minimum": self.minimum, "maximum": self.maximum, "exclusiveMaximum": self.below}
        return schema | {key: value for key, value in bounds.items() if value is not None}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    select: Method
    settings: tuple[Setting, ...]
    needs_attention: bool  # reads attention at layer K-1, so it cannot select before the LLM (layer 0)
    grid_cells: bool  # keeps grid cells only, never LLaVA-NeXT's row separators: at least one per image
    check: Callable[[PruningConfig], None] | None  # checks across settings
    check_share: Callable[[PruningConfig, int], None] | None  # checks one image's share of the budget


_METHODS: dict[str, MethodSpec] = {}


def register(
    name: str,
    settings: tuple[Setting, ...] = (),
    needs_attention: bool = False,
    grid_cells: bool = False,
    check: Callable[[PruningConfig], None] | None = None,
    check_share: Callable[[PruningConfig, int], None] | None = None,
) -> Callable[[Method], Method]:
    def add(fn: Method) -> Method:
        if name in _METHODS:
            raise ValueError(f"pruning method {name!r} is already registered")
        for setting in settings:
            other = all_settings().get(setting.name)
            if setting.name in RESERVED or (other is not None and other != setting):
                raise ValueError(f"setting {setting.name!r} of {name!r} clashes with another declaration")
        _METHODS[name] = MethodSpec(name, fn, settings, needs_attention, grid_cells, check, check_share)
        return fn

    return add


RESERVED = ("method", "budget", "ratio", "layer")


def method_spec(name: str) -> MethodSpec:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(available_methods())}") from None


def get_method(name: str) -> Method:
    return method_spec(name).select


def available_methods() -> list[str]:
    return sorted(_METHODS)


def all_settings() -> dict[str, Setting]:
    """Every method's settings by name (a name means one thing for every method that reads it)."""
    return {setting.name: setting for spec in _METHODS.values() for setting in spec.settings}
