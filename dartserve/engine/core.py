"""The engine core: one model, its KV pool, a scheduler and a runner, stepping many requests.

``add_request`` checks a request and queues it; each ``step`` runs what the scheduler chose in
one forward pass and returns every request's new token; ``abort`` takes a request out and frees
its blocks. Nothing here is thread-safe: ``EngineLoop`` (``engine.loop``) owns a core in a
thread of its own and serves callers from any thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dartserve.checks import SettingError
from dartserve.defaults import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS
from dartserve.engine.kv_manager import KVCacheManager, check_fits
from dartserve.engine.requests import CoreRequest, RequestOutput, RequestState, Status
from dartserve.engine.runner import ModelRunner, SchedulerOutput
from dartserve.engine.scheduler import Scheduler
from dartserve.models.selection import check_request
from dartserve.kv.cache import RaggedKVCache
from dartserve.kv.pool import DEFAULT_BLOCK_SIZE, KVPool, pool_blocks
from dartserve.models.base import ModelAdapter
from dartserve.models.decode import check_room
from dartserve.timing import stopwatch



@dataclass(frozen=True)
class CoreConfig:
    kv_cache_mb: float | None = None  # None: a share of free CUDA memory, or 2048 MB on the CPU
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = MAX_NUM_SEQS


@dataclass(frozen=True)
class Step:
    """One step the core ran, as its observers see it (metrics, benchmarks)."""

    decodes: int  # requests that each got one token
    prefill_tokens: int  # prompt and fed tokens
    requests: int  # requests in the step
    seconds: float


@dataclass
class StepLog:
    """An observer that keeps every step, for a benchmark or a test."""

    steps: list[Step] = field(default_factory=list)

    def __call__(self, step: Step) -> None:
        self.steps.append(step)

    @property
    def decode_batch(self) -> list[int]:
        return [s.decodes for s in self.steps]

    @property
    def prefill_tokens(self) -> list[int]:
        return [s.prefill_tokens for s in self.steps]

    @property
    def max_running(self) -> int:
        return max((s.requests for s in self.steps), default=0)


class EngineCore:
    def __init__(self, adapter: ModelAdapter, config: CoreConfig = CoreConfig(), observers: tuple[Callable[[Step], None], ...] = ()) -> None:
        text = adapter.text.config
        kv_heads = text.num_key_value_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        block_bytes = KVPool.block_bytes(config.block_size, kv_heads, head_dim, adapter.dtype)
        blocks = pool_blocks(config.kv_cache_mb, block_bytes, adapter.device)
        self.adapter = adapter
        self.config = config
        self.pool = KVPool(blocks, config.block_size, kv_heads, head_dim, adapter.dtype, adapter.device)
        self.kv = KVCacheManager(self.pool)
        self.scheduler = Scheduler(adapter, self.kv, config.max_num_batched_tokens, config.max_num_seqs)
        self.runner = ModelRunner(adapter, self.pool)
        self.observers = list(observers)
        self._ids: set[str] = set()

    def check(self, request: CoreRequest) -> None:
        """A ValueError (a ``SettingError`` naming the field where one is to blame) for a request
        the core cannot run, before it is queued."""
        if not isinstance(request, CoreRequest):
            raise ValueError(f"submit a CoreRequest, got {type(request).__name__}")
        adapter = self.adapter
        continues = request.parent is not None or request.cache is not None
        if (request.prompt is not None) == continues:
            raise ValueError("a request brings either a prompt or a cache to continue from (parent or cache)")
        vocabulary = adapter.lm_head.out_features
        for token in (*request.feed, *request.answer):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocabulary:
                raise ValueError(f"token ids must be integers from 0 to {vocabulary - 1}, got {token!r}")
        sampling = request.sampling
        if len(request.answer) >= sampling.max_new_tokens:
            raise SettingError(f"the answer already has {len(request.answer)} tokens, max_new_tokens={sampling.max_new_tokens}", "max_new_tokens")
        if request.prompt is not None:
            if request.feed:
                raise ValueError("a new prompt takes no fed tokens")
            pruning = request.pruning
            pruning.check_layers(adapter.num_layers)
            shares = pruning.span_budgets([s.length for s in request.prompt.spans])
            check_request(adapter, request.prompt, pruning, shares)
            check_room(adapter, int(request.prompt.positions.max()) + 1, sampling)
        else:
            if not request.feed:
                raise ValueError("a continuation needs at least one token to feed")
            if request.cache is not None:
                check_cache(adapter, request.cache)
                check_room(adapter, int(request.cache.next_position[0]) + len(request.feed) - len(request.answer), sampling)
        state = RequestState(request, adapter.num_layers)
        if request.prompt is not None or request.cache is not None:
            check_fits(self.pool, state.layout, state.target_lengths(extra=sampling.max_new_tokens))

    def add_request(self, request: CoreRequest) -> None:
        self.check(request)
        if request.request_id in self._ids:
            raise ValueError(f"request id {request.request_id!r} is already running")
        self._ids.add(request.request_id)
        self.scheduler.add_request(RequestState(request, self.adapter.num_layers))

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.scheduler.abort(request_id)
        if state is None:
            return None
        self._free(state)
        return RequestOutput(request_id, finished=True, finish_reason="abort", state=state)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        outputs = [self._failure(state, error) for state, error in self.scheduler.failed]
        self.scheduler.failed.clear()
        if not plan:
            return outputs
        times: list[float] = []
        try:
            with stopwatch(self.adapter.device, times):
                sampled = self.runner.execute(plan)
        except Exception as error:  # noqa: BLE001 - the step's requests fail; the core goes on
            return outputs + self._fail_step(plan, error)
        stepped, finished = self.scheduler.update_from_output(plan, sampled, times[0])
        by_id = {o.request_id: o for o in stepped}
        for state in finished:
            self._release(state, by_id[state.request_id])
        step = Step(len(plan.decodes), sum(w.count for w in plan.chunks), len(plan.decodes) + len(plan.chunks), times[0])
        for observer in self.observers:
            observer(step)
        return outputs + stepped

    def _release(self, state: RequestState, output: RequestOutput) -> None:
        """A finished request's cache goes out if asked for, then its blocks are kept or freed."""
        request = state.request
        if request.export_cache or request.prefill_only:
            output.cache = self.runner.export(state.layout)
        elif request.export_tail:
            output.cache = self.runner.export(state.layout, start=state.start_lengths)
        if request.keep is not None:
            self.kv.keep(request.keep, state.layout)
        else:
            self.kv.free(state.layout)
        output.state = state
        self._ids.discard(state.request_id)

    def _failure(self, state: RequestState, error: Exception) -> RequestOutput:
        self._free(state)
        return RequestOutput(state.request_id, finished=True, finish_reason="error", error=error, state=state)

    def _fail_step(self, plan: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        states = [*plan.decodes, *(w.state for w in plan.chunks), *plan.loads]
        outputs = []
        for state in dict.fromkeys(states):
            if state in self.scheduler.running:
                self.scheduler.running.remove(state)
            state.status = Status.FINISHED
            outputs.append(self._failure(state, error))
        return outputs

    def _free(self, state: RequestState) -> None:
        self.kv.free(state.layout)
        self._ids.discard(state.request_id)

    def usage(self) -> dict:
        """Blocks in use per layer group (below K, from K on) and kept for reuse, and the pool's size."""
        groups = [0, 0]
        for state in self.scheduler.running:
            layout = state.layout
            for layer, count in enumerate(layout.counts):
                groups[layer >= layout.cut] += count
        return {
            "blocks": self.pool.num_blocks,
            "used": self.pool.num_used,
            "below_k": groups[0],
            "from_k": groups[1],
            "resident": self.kv.resident_blocks,
            "peak_used": self.pool.peak_used,
            "block_bytes": self.pool.nbytes // (self.pool.num_blocks + 1),
        }


def check_cache(adapter: ModelAdapter, cache: RaggedKVCache) -> None:
    """A ValueError for a cache that is not one request's, of this model's shape."""
    if not isinstance(cache, RaggedKVCache) or cache.batch_size != 1:
        raise ValueError("a cache to continue from is one request's RaggedKVCache")
    if len(cache.keys) != adapter.num_layers or len(cache.layer_group) != adapter.num_layers:
        raise ValueError(f"the cache has {len(cache.keys)} layers; the model has {adapter.num_layers}")
    groups = cache.layer_group
    if list(groups) != sorted(groups) or set(groups) - {0, 1} or len(cache.token_index) != max(groups) + 1:
        raise ValueError("the cache's layer groups must be 0 below K and 1 from K on, with a token index for each")
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        index = cache.token_index[groups[i]]
        if k.shape != v.shape or k.dim() != 4 or k.shape[2] != index.shape[1] or bool((index < 0).any()):
            raise ValueError(f"layer {i} of the cache does not match its token index")
    if torch.is_floating_point(cache.next_position):
        raise ValueError("the cache's next position must be an integer")
