"""Pruning methods by name. A method is a function
``select(ctx, span, budget, config) -> Selection``; registering one touches no model code.
A method names the settings it reads beyond the amount and the layer, which every method but
``none`` reads: a request that sets another is refused, not silently ignored."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from dartserve.pruning.base import ImageSpan, Selection, SelectionContext
    from dartserve.pruning.config import PruningConfig

    Method = Callable[[SelectionContext, ImageSpan, int, PruningConfig], Selection]

_METHODS: dict[str, "Method"] = {}
_SETTINGS: dict[str, tuple[str, ...]] = {}


def register(name: str, settings: tuple[str, ...] = ()) -> Callable[["Method"], "Method"]:
    def add(fn: "Method") -> "Method":
        if name in _METHODS:
            raise ValueError(f"pruning method {name!r} is already registered")
        _METHODS[name], _SETTINGS[name] = fn, settings
        return fn

    return add


def method_settings(name: str) -> tuple[str, ...]:
    """The settings of ``PruningConfig`` that method ``name`` reads beyond budget, ratio and layer."""
    get_method(name)
    return _SETTINGS[name]


def get_method(name: str) -> "Method":
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    return sorted(_METHODS)
