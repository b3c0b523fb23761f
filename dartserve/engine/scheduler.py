"""The scheduler: which requests run in the next step, and how many of their tokens.

Policy, each step:

1. Every running request goes on, in the order it was admitted: one token for a request that
   is decoding, the next chunk for a prompt being prefilled in chunks. A decode that needs a new
   block and finds none first evicts kept turns (least recently kept first), then preempts the
   most recently admitted running request: its cache is copied out of the pool and it waits at
   the head of the queue to be loaded back.
2. Then waiting requests, first come first served, while the step's token budget
   (``max_num_batched_tokens``) and ``max_num_seqs`` allow and the pool can hold each one's
   whole prompt. A prompt longer than what is left of the budget runs in chunks over several
   steps (layers below K take a chunk at a time; the kept tokens go on once the last chunk has
   reached K).

All of it runs in one forward pass, so a running decode waits at most one step for a prefill,
and requests with different K share the step. The scheduler never touches tensors.
"""

from __future__ import annotations

import time
from collections import deque

from dartserve.engine.kv_manager import KVCacheManager
from dartserve.engine.requests import Layout, RequestOutput, RequestState, Status, cache_cut
from dartserve.engine.runner import Sampled, SchedulerOutput, ScheduledWork
from dartserve.models.base import ModelAdapter
from dartserve.models.decode import finish_reason


class Scheduler:
    def __init__(self, adapter: ModelAdapter, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least max_num_seqs ({max_num_seqs}): every running request decodes each step")
        self.adapter = adapter
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.failed: list[tuple[RequestState, Exception]] = []  # refused at admission, for the core to report

    def add_request(self, state: RequestState) -> None:
        self.waiting.append(state)

    def schedule(self) -> SchedulerOutput:
        plan = SchedulerOutput()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running):
            state = self.running[index]
            if state.is_decode:
                if not self.kv.grow(state.layout, state.target_lengths()):
                    victim = self.running.pop()
                    self._preempt(victim, plan)
                    if victim is state:
                        break
                    continue
                plan.decodes.append(state)
                budget -= 1
            elif budget > 0:
                count = min(state.pending, budget)
                plan.chunks.append(ScheduledWork(state, count))
                budget -= count
            index += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not plan.swaps:
            state = self.waiting[0]
            try:
                if not self._admit(state, plan):
                    break
            except LookupError as error:
                self.waiting.popleft()
                state.status = Status.FINISHED
                self.failed.append((state, error))
                continue
            self.waiting.popleft()
            self.running.append(state)
            state.status = Status.RUNNING
            if not state.start_lengths:
                state.start_lengths = list(state.layout.lengths)
            if state.metrics.first_scheduled is None:
                state.metrics.first_scheduled = time.perf_counter()
            if state.is_decode:
                plan.decodes.append(state)
                budget -= 1
            else:
                count = min(state.pending, budget)
                plan.chunks.append(ScheduledWork(state, count))
                budget -= count
        return plan

    def _admit(self, state: RequestState, plan: SchedulerOutput) -> bool:
        """Gives a waiting request the blocks for all its pending work, and places the cache it
        continues from; False, with nothing changed, when the pool cannot hold it yet."""
        parent = state.request.parent
        if parent is not None and state.base is None and not state.layout.seq_len:
            if not self.kv.adopt(parent, state):
                raise LookupError(f"the KV cache {parent!r} is no longer resident and the request brought none")
            if not self.kv.grow(state.layout, state.target_lengths()):
                self.kv.keep(parent, state.layout)  # back where it was, for a later step
                state.layout = Layout.empty(state.layout.cut, state.layout.num_layers)
                return False
            return True
        if state.base is not None:
            base = state.base
            layout = Layout.empty(cache_cut(base), state.layout.num_layers)
            if not self.kv.grow(layout, state.target_lengths()):
                return False
            layout.token_index = [index[0].tolist() for index in base.token_index]
            layout.lengths = [len(index) for index in layout.token_index]
            layout.seq_len = max(layout.token_index[0]) + 1
            layout.next_position = int(base.next_position[0])
            state.layout = layout
            plan.loads.append(state)
            return True
        return self.kv.grow(state.layout, state.target_lengths())

    def _preempt(self, victim: RequestState, plan: SchedulerOutput) -> None:
        """Takes a running request out of the pool and puts it first in the queue: one in its
        prompt starts it again; any other has its cache copied out (``plan.swaps``) and loaded
        back when it is admitted again."""
        layout = victim.layout
        self.kv.free(layout)
        victim.layout = Layout.empty(layout.cut, layout.num_layers)
        if victim.prompt_left:
            victim.prompt_done, victim.stash = 0, []
        else:
            plan.swaps.append((victim, layout))
        victim.status = Status.WAITING
        victim.metrics.preemptions += 1
        self.waiting.appendleft(victim)

    def update_from_output(self, plan: SchedulerOutput, sampled: dict[str, Sampled], step_s: float) -> tuple[list[RequestOutput], list[RequestState]]:
        """Records what the step did; returns each request's output and the requests that finished
        (still holding their blocks, which the core copies out or keeps before freeing)."""
        outputs, finished = [], []
        now = time.perf_counter()
        for state, count in [(s, 1) for s in plan.decodes] + [(w.state, w.count) for w in plan.chunks]:
            result = sampled[state.request_id]
            layout = state.layout
            if state.prompt_left:
                start = state.prompt_done
                state.prompt_done += count
                state.metrics.prefill_s += step_s
                layout.token_index[0].extend(range(start, start + count))
                layout.lengths[0] += count
                if not state.prompt_left:
                    prompt = state.request.prompt
                    layout.seq_len = len(prompt.input_ids)
                    layout.next_position = int(prompt.positions.max()) + 1
                    if len(layout.lengths) == 2:
                        layout.token_index[1] = result.kept_index
                        layout.lengths[1] = len(result.kept_index)
                        state.kept_positions = result.kept_positions
                        state.metrics.selection_s += result.selection_s
                    else:
                        state.kept_positions = [p for s in prompt.spans for p in range(s.start, s.end)]
            else:
                fed = range(layout.seq_len, layout.seq_len + count)
                for g, index in enumerate(layout.token_index):
                    index.extend(fed)
                    layout.lengths[g] += count
                layout.seq_len += count
                layout.next_position += count
                state.feed = state.feed[count:]
            if result.token is None:
                continue
            output = RequestOutput(state.request_id, [result.token], time=now, state=state)
            if result.logits is not None:
                output.logits.append(result.logits)
            if len(state.output) == len(state.request.answer) and state.request.prompt is not None:
                output.kept_positions = state.kept_positions  # with a prompt's first token
            state.output.append(result.token)
            state.metrics.first_token = state.metrics.first_token or now
            state.metrics.last_token = now
            reason = finish_reason(self.adapter, state.request.sampling, result.token, len(state.output))
            if reason or state.request.prefill_only:
                state.finish_reason = reason
                state.status = Status.FINISHED
                state.metrics.finished = now
                self.running.remove(state)
                finished.append(state)
                output.finished, output.finish_reason = True, reason
            else:
                state.feed = [result.token]
            outputs.append(output)
        return outputs, finished

    def abort(self, request_id: str) -> RequestState | None:
        """Takes a request out of the queues; the caller frees its blocks."""
        for queue in (self.waiting, self.running):
            for state in queue:
                if state.request_id == request_id:
                    queue.remove(state)
                    state.status = Status.FINISHED
                    return state
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

