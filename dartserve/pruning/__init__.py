"""Visual-token pruning methods, selected by name through the registry."""

from dartserve.pruning import cdpruner, dart, divprune, fastv, none, pooling, random, window_fastv  # noqa: F401  (registers them)
from dartserve.pruning.base import Grid, ImageSpan, Selection, SelectionContext
from dartserve.pruning.config import PruningConfig, split_proportional
from dartserve.pruning.dart import dart_select
from dartserve.pruning.divprune import divprune_select
from dartserve.pruning.registry import Setting, available_methods, get_method, register

__all__ = [
    "Grid",
    "ImageSpan",
    "PruningConfig",
    "Selection",
    "SelectionContext",
    "Setting",
    "available_methods",
    "dart_select",
    "divprune_select",
    "get_method",
    "register",
    "split_proportional",
]
