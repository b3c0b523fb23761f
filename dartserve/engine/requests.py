"""What the engine core takes in, what it gives out, and what it keeps of a request meanwhile."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from dartserve.kv.cache import RaggedKVCache
from dartserve.models.base import EncodedPrompt
from dartserve.models.decode import SamplingConfig
from dartserve.pruning.config import PruningConfig


class Abandoned(Exception):
    """The caller gave up before the work began, or while it waited: it was not done."""


@dataclass(frozen=True)
class CoreRequest:
    """One sequence for the core to run.

    A new prompt comes as ``prompt`` (prefilled with ``pruning``). A continuation comes from the
    blocks a finished request left resident under ``parent``, or, when they are gone, from
    ``cache``; ``feed`` are the tokens to run after it (a conversation's next turn, or the picked
    token that is not yet in the cache), and ``answer`` the tokens of this answer already picked
    elsewhere, which count towards ``max_new_tokens`` and the sampling seed's step.
    """

    request_id: str
    prompt: EncodedPrompt | None = None
    pruning: PruningConfig = field(default_factory=lambda: PruningConfig(method="none"))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    parent: str | None = None
    cache: RaggedKVCache | None = None
    feed: tuple[int, ...] = ()
    answer: tuple[int, ...] = ()
    keep: str | None = None  # once finished, its blocks stay resident under this key (LRU)
    prefill_only: bool = False  # finish after the first token, with the cache
    export_cache: bool = False  # the final output carries the request's cache
    export_tail: bool = False  # ... or only what this request added to the cache it continued
    keep_logits: bool = False  # outputs carry the logits each token was picked from


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    prefill_s: float = 0.0  # the steps its prompt ran in, shared with the other work of those steps
    selection_s: float = 0.0
    preemptions: int = 0


@dataclass
class RequestOutput:
    """What one step gave a request: at most one token; ``finished`` on its last output."""

    request_id: str
    tokens: list[int] = field(default_factory=list)
    time: float = 0.0  # perf_counter when its step ended
    logits: list[torch.Tensor] = field(default_factory=list)
    kept_positions: list[int] | None = None  # with the first token of a pruned prompt
    finished: bool = False
    finish_reason: str = ""  # stop, length, abort or error
    error: BaseException | None = None
    cache: RaggedKVCache | None = None
    state: RequestState | None = field(default=None, repr=False)  # its times (``metrics``) and, once finished, its lengths


@dataclass
class Layout:
    """Where one request's tokens are in the pool.

    Layers below ``cut`` form group 0 and hold every token; layers from ``cut`` on form group 1
    and hold the tokens kept at K (``cut`` is the number of layers when nothing is pruned, and
    there is one group). ``token_index[g]`` are the sequence indices of group g's slots, in
    order; ``tables[i, :counts[i]]`` are layer i's blocks.
    """

    cut: int
    num_layers: int
    tables: torch.Tensor  # [layers, capacity] block ids; 0 (the padding block) past counts
    counts: list[int]
    lengths: list[int]
    token_index: list[list[int]]
    seq_len: int = 0
    next_position: int = 0

    @classmethod
    def empty(cls, cut: int, num_layers: int) -> Layout:
        groups = 1 if cut == num_layers else 2
        return cls(cut, num_layers, torch.zeros(num_layers, 8, dtype=torch.long), [0] * num_layers, [0] * groups, [[] for _ in range(groups)])

    def group(self, layer: int) -> int:
        return 0 if layer < self.cut else 1

    def layer_length(self, layer: int) -> int:
        return self.lengths[self.group(layer)]

    def layer_lengths(self, lengths: list[int]) -> list[int]:
        """Group lengths spread over the layers."""
        return [lengths[self.group(i)] for i in range(self.num_layers)]

    def blocks(self) -> list[int]:
        return [int(b) for i, n in enumerate(self.counts) for b in self.tables[i, :n]]


class RequestState:
    """A request in the core: its pending work, its answer so far and its place in the pool."""

    def __init__(self, request: CoreRequest, num_layers: int) -> None:
        self.request = request
        self.request_id = request.request_id
        self.status = Status.WAITING
        self.output = list(request.answer)
        self.logits: list[torch.Tensor] = []
        self.metrics = RequestMetrics()
        prompt = request.prompt
        self.prompt_done = 0  # prompt tokens through the layers below the cut
        self.stash: list[torch.Tensor] = []  # those tokens' output of the layer before the cut, until the last chunk
        self.kept_positions: list[int] | None = None
        self.base = request.cache
        self.feed = list(request.feed)
        if prompt is not None:
            # A prompt without images has nothing to prune: one group, as unpruned.
            cut = request.pruning.layer if request.pruning.prunes and prompt.spans else num_layers
            self.budgets = request.pruning.span_budgets([s.length for s in prompt.spans])
            self.kept_len = len(prompt.input_ids) - prompt.num_vision_tokens + sum(self.budgets)
        else:
            cut = num_layers if self.base is None else cache_cut(self.base)
            self.budgets, self.kept_len = [], 0
        self.layout = Layout.empty(cut, num_layers)
        self.start_lengths: list[int] = []  # its group lengths once admitted: where what it adds begins
        self.finish_reason = ""

    @property
    def prompt_left(self) -> int:
        prompt = self.request.prompt
        return 0 if prompt is None else len(prompt.input_ids) - self.prompt_done

    @property
    def pending(self) -> int:
        """Tokens of work left before the next token is picked."""
        return self.prompt_left or len(self.feed)

    @property
    def is_decode(self) -> bool:
        return not self.prompt_left and len(self.feed) == 1 and self.layout.seq_len > 0

    def target_lengths(self, extra: int = 0) -> list[int]:
        """Group lengths once its pending work has run, plus ``extra`` tokens."""
        if self.prompt_left:
            full = len(self.request.prompt.input_ids)
            return [n + extra for n in [full, self.kept_len][: len(self.layout.lengths)]]
        if self.base is not None:
            lengths = [int((index[0] >= 0).sum()) for index in self.base.token_index]
        else:
            lengths = self.layout.lengths
        return [n + len(self.feed) + extra for n in lengths]


def cache_cut(cache: RaggedKVCache) -> int:
    """The first layer of a cache's reduced group (its number of layers when there is none)."""
    return cache.layer_group.index(1) if 1 in cache.layer_group else len(cache.layer_group)
