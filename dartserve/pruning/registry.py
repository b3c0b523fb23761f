"""Pruning methods by name. A method is a function
``select(ctx, span, budget, config) -> Selection``; registering one touches no model code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from dartserve.pruning.base import ImageSpan, Selection, SelectionContext
    from dartserve.pruning.config import PruningConfig

    Method = Callable[[SelectionContext, ImageSpan, int, PruningConfig], Selection]

_METHODS: dict[str, "Method"] = {}


def register(name: str) -> Callable[["Method"], "Method"]:
    def add(fn: "Method") -> "Method":
        if name in _METHODS:
            raise ValueError(f"pruning method {name!r} is already registered")
        _METHODS[name] = fn
        return fn

    return add


def get_method(name: str) -> "Method":
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; known: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    return sorted(_METHODS)
