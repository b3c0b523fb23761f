"""Type checks for user-supplied settings, so that bad input ends in a ValueError naming the field."""

from __future__ import annotations

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes no more
MAX_PIXELS = 4096 * 4096  # the largest image decoded, unless a server sets its own


class SettingError(ValueError):
    """A value that is wrong only for this request, found once its images and prompt are known.
    ``param`` names the setting as a request does (``pruning.budget``, ``max_new_tokens``,
    ``image``), so a server can say which one to change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def require_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")


def require_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
