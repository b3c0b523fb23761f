"""Decoding from a ragged cache: greedy or nucleus sampling, stop tokens, a token limit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dartserve.checks import SEED_LIMIT, SettingError, require_int, require_number
from dartserve.kv.cache import RaggedKVCache
from dartserve.models.attention import attention_mask
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


@torch.inference_mode()
def decode_step(
    adapter: ModelAdapter, cache: RaggedKVCache, tokens: torch.Tensor, active: torch.Tensor | None = None
) -> torch.Tensor:
    """Feeds one token per request ``[batch]``; returns the next logits ``[batch, vocab]``.

    Requests that are no longer ``active`` still run (the batch stays rectangular) but their
    slot is recorded as padding, so their cache holds only the tokens they generated.
    """
    hidden = adapter.text.embed_tokens(tokens[:, None].to(adapter.device))
    active = torch.ones(len(tokens), dtype=torch.bool) if active is None else active
    active = active.to(cache.next_position.device)
    # Group 0 (the layers below K) holds every token, so its last index is the sequence length so far.
    index = torch.where(active, cache.token_index[0].amax(dim=1) + 1, -1)
    cache.append_tokens(index[:, None])
    positions = cache.next_position[None, :, None].expand(adapter.position_dims, -1, 1)
    cos_sin = adapter.rope(hidden, positions)
    masks = [attention_mask(index, 1) for index in cache.token_index]
    logits = _next_logits(adapter, cache, hidden, masks, cos_sin)
    cache.next_position += active.long()
    return logits


def _next_logits(adapter: ModelAdapter, cache: RaggedKVCache, hidden, masks, cos_sin) -> torch.Tensor:
    """Runs new tokens through every layer, each layer with its group's mask; the last token's logits."""
    for i, layer in enumerate(adapter.layers):
        hidden = layer(hidden, attention_mask=masks[cache.layer_group[i]], position_embeddings=cos_sin, past_key_values=cache, use_cache=True)
    return adapter.lm_head(adapter.text.norm(hidden[:, -1])).float()


@torch.inference_mode()
def extend(adapter: ModelAdapter, cache: RaggedKVCache, token_ids: list[int]) -> torch.Tensor:
    """Prefills ``token_ids`` after one request's cached tokens (a conversation's next turn) and
    returns the logits of the token after them ``[1, vocab]``. Only the new tokens are computed."""
    if cache.batch_size != 1 or not token_ids:
        raise ValueError("extend takes one request's cache and at least one token")
    n, device = len(token_ids), cache.next_position.device
    hidden = adapter.text.embed_tokens(torch.tensor([token_ids], device=adapter.device))
    cache.append_tokens(cache.token_index[0].amax(dim=1, keepdim=True) + 1 + torch.arange(n, device=device))
    positions = (cache.next_position[:, None] + torch.arange(n, device=device))[None]
    cos_sin = adapter.rope(hidden, positions.expand(adapter.position_dims, -1, -1))
    # An explicit mask always: with cached slots before the new queries, SDPA's causal flag alone
    # would line the queries up with the first slots instead of the last.
    masks = []
    for index in cache.token_index:
        slots = index.shape[1]
        masks.append((torch.arange(slots, device=device)[None] <= torch.arange(slots - n, slots, device=device)[:, None])[None, None])
    logits = _next_logits(adapter, cache, hidden, masks, cos_sin)
    cache.next_position += n
    return logits


def stop_tokens(adapter: ModelAdapter, sampling: SamplingConfig) -> set[int]:
    return set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else adapter.eos_token_ids)


def decode(
    adapter: ModelAdapter, cache: RaggedKVCache, logits: torch.Tensor, samplings: list[SamplingConfig]
) -> list[list[int]]:
    """Generates from a prefilled cache until every request hits a stop token or its limit.

    ``logits`` are the prefill's next-token logits; the cache grows by the tokens fed back.
    Stop tokens are included in the output, as transformers' ``generate`` does.
    """
    batch = cache.batch_size
    if len(samplings) != batch:
        raise ValueError(f"{len(samplings)} sampling configs for a batch of {batch}")
    for position, sampling in zip(cache.next_position.tolist(), samplings):
        check_room(adapter, position, sampling)
    stops = [stop_tokens(adapter, s) for s in samplings]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    while True:
        tokens = [pick_token(logits[b], samplings[b], len(outputs[b])) for b in range(batch)]
        for b, token in enumerate(tokens):
            if not done[b]:
                outputs[b].append(token)
                done[b] = token in stops[b] or len(outputs[b]) >= samplings[b].max_new_tokens
        if all(done):
            return outputs
        logits = decode_step(adapter, cache, torch.tensor(tokens), ~torch.tensor(done))


def finish_reason(adapter: ModelAdapter, sampling: SamplingConfig, token: int, count: int) -> str:
    """Why an answer whose ``count``-th token is ``token`` ends there ("stop", "length"), or ""."""
    if token in stop_tokens(adapter, sampling):
        return "stop"
    return "length" if count >= sampling.max_new_tokens else ""


def decode_after(adapter: ModelAdapter, cache: RaggedKVCache, token: int, count: int, sampling: SamplingConfig):
    """Yields one request's tokens after its ``count``-th, ``token``, which is picked but not yet
    in the cache; the same tokens ``decode`` gives, one at a time, for streaming."""
    while not finish_reason(adapter, sampling, token, count):
        logits = decode_step(adapter, cache, torch.tensor([token]))
        token = pick_token(logits[0], sampling, count)
        count += 1
        yield token
