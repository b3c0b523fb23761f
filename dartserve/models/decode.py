"""Decoding settings: greedy or nucleus sampling, stop tokens, a token limit; picking a token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dartserve.checks import SEED_LIMIT, SettingError, require_int, require_number
from dartserve.models.base import ModelAdapter


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # beyond them, float32 logits / temperature overflow or flatten to noise


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature`` 0 is greedy. The draw for the n-th new token comes from a generator
    seeded with ``seed`` and n alone, so a request gives the same tokens alone or in a batch,
    and when its first token is picked by one service and the rest by another."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # the model's end-of-sequence tokens do not end the answer (benchmarks)

    def __post_init__(self) -> None:
        require_int("max_new_tokens", self.max_new_tokens, minimum=1)
        require_number("temperature", self.temperature)
        require_number("top_p", self.top_p)
        require_int("seed", self.seed, minimum=0, maximum=SEED_LIMIT - 1)
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.stop_token_ids, tuple):
            raise ValueError(f"stop_token_ids must be a tuple of token ids, got {self.stop_token_ids!r}")
        for token in self.stop_token_ids:
            require_int("a stop token id", token, minimum=0)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")


def pick_token(logits: torch.Tensor, sampling: SamplingConfig, step: int) -> int:
    """The ``step``-th new token (0: the first) of a request."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    generator = torch.Generator().manual_seed((sampling.seed * 1_000_003 + step) % SEED_LIMIT)
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest head whose mass reaches top_p. The most likely token always stays,
        # also for a top_p that rounds to 0 in the logits' float32, which would leave nothing.
        outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p
        outside[0] = False
        probs[order[outside]] = 0.0
    return int(torch.multinomial(probs, 1, generator=generator))


def check_room(adapter: ModelAdapter, next_position: int, sampling: SamplingConfig) -> None:
    """Rejects a request whose answer could run past the model's rotary positions."""
    if next_position + sampling.max_new_tokens > adapter.max_positions:
        raise SettingError(
            f"the prompt takes {next_position} positions and max_new_tokens={sampling.max_new_tokens} more, "
            f"past the model's {adapter.max_positions}",
            "max_new_tokens",
        )


def stop_tokens(adapter: ModelAdapter, sampling: SamplingConfig) -> set[int]:
    return set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else adapter.eos_token_ids)


def finish_reason(adapter: ModelAdapter, sampling: SamplingConfig, token: int, count: int) -> str:
    """Why an answer whose ``count``-th token is ``token`` ends there ("stop", "length"), or ""."""
    if token in stop_tokens(adapter, sampling):
        return "stop"
    return "length" if count >= sampling.max_new_tokens else ""
