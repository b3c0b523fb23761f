"""The model runner: one scheduled step as one forward pass of the stock decoder layers.

Every token of the step (one per decoding request, a chunk of each prompt being prefilled, the
tokens of a conversation's next turn) runs through each layer as one packed sequence, so the
projections and the MLP see them all at once; attention is per request, over the pool
(``engine.attention``). Before layer K of a prompt whose last chunk runs in this step, its
pruning method picks the vision tokens to keep, and from there on only those rows go on: the
packed sequence changes length between layers, and requests with different K share a step.
The runner decides nothing: it runs what the scheduler chose and reports the tokens it picked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch

from dartserve.engine.attention import ATTENTION, LayerStep, Segment, Workspace
from dartserve.engine.cpu_linear import onednn_linears
from dartserve.engine.requests import Layout, RequestState
from dartserve.models.selection import check_selection, reduce_rows
from dartserve.kv.cache import RaggedKVCache
from dartserve.kv.pool import KVPool
from dartserve.models.attention import last_token_attention
from dartserve.models.base import ModelAdapter
from dartserve.models.decode import pick_token
from dartserve.pruning.base import SelectionContext
from dartserve.pruning.registry import get_method
from dartserve.timing import stopwatch


@dataclass
class ScheduledWork:
    """``count`` tokens of a request's pending work in this step."""

    state: RequestState
    count: int


@dataclass
class SchedulerOutput:
    decodes: list[RequestState] = field(default_factory=list)  # one token each, after a past in the pool
    chunks: list[ScheduledWork] = field(default_factory=list)  # prompt chunks and fed tokens
    loads: list[RequestState] = field(default_factory=list)  # whose ``base`` cache goes into the pool first
    swaps: list[tuple[RequestState, Layout]] = field(default_factory=list)  # preempted: copied out before anything runs

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(w.count for w in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.chunks or self.swaps)


@dataclass
class Sampled:
    token: int | None  # None when the request's pending work goes on in a later step
    logits: torch.Tensor | None = None
    kept_index: list[int] | None = None  # sequence indices the layers from K on keep, when pruned in this step
    kept_positions: list[int] | None = None
    selection_s: float = 0.0


@dataclass
class _Work:
    """A request's rows in the step: per layer, how many, after how many of its tokens, where."""

    state: RequestState
    count: int
    is_prompt: bool
    start: int
    final: bool
    rows: list[int]
    past: list[int]
    row_at: list[int] = field(default_factory=list)
    input_row: int = 0  # where its tokens are in the step's input, before layer 0

    def cut_at(self, layer: int) -> bool:
        """Whether its prompt is pruned before ``layer`` (its rows then change there, even where
        a last chunk happens to be as long as the tokens kept)."""
        return self.is_prompt and self.state.layout.cut == layer

    def rows_into(self, layer: int) -> tuple[int, int]:
        """Where its rows entering ``layer`` are, and how many: the previous layer's output, or
        the step's input for layer 0."""
        return (self.row_at[layer - 1], self.rows[layer - 1]) if layer else (self.input_row, self.count)


class ModelRunner:
    def __init__(self, adapter: ModelAdapter, pool: KVPool) -> None:
        self.adapter = adapter
        self.pool = pool
        self.num_layers = adapter.num_layers
        self.workspace = Workspace(pool)
        adapter.text.config._attn_implementation = ATTENTION
        if adapter.device.type == "cpu":
            for part in (adapter.text, adapter.lm_head):
                onednn_linears(part)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> dict[str, Sampled]:
        for state, layout in plan.swaps:
            state.base = self.export(layout, torch.device("cpu"))
        for state in plan.loads:
            self._load(state)
        works = [self._decode_work(s) for s in plan.decodes] + [self._chunk_work(w) for w in plan.chunks]
        if not works:
            return {}
        row = 0
        for work in works:
            work.input_row = row
            row += work.count
        for i in range(self.num_layers):
            row = 0
            for work in works:
                work.row_at.append(row)
                row += work.rows[i]
        decodes = len(plan.decodes)
        steps = self._layer_steps(works, decodes)
        hidden, positions = self._inputs(works)
        sampled: dict[str, Sampled] = {w.state.request_id: Sampled(None) for w in works}
        layer_input = input_cos_sin = cos_sin = None
        for i, layer in enumerate(self.adapter.layers):
            if any(w.cut_at(i) for w in works):
                hidden, positions = self._cut(works, i, hidden, positions, layer_input, input_cos_sin, sampled)
                if not hidden.shape[1]:  # only prompt chunks that wait at K for the rest of their prompt
                    return sampled
                cos_sin = None
            if cos_sin is None:
                cos_sin = self.adapter.rope(hidden, positions[:, None])
            layer_input, input_cos_sin = hidden, cos_sin
            hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin, pool_step=steps)
        picked = [w for w in works if w.final]
        if not picked:  # only chunks of work that goes on in a later step
            return sampled
        last = self.num_layers - 1
        rows = torch.tensor([w.row_at[last] + w.rows[last] - 1 for w in picked], dtype=torch.long, device=hidden.device)
        logits = self.adapter.lm_head(self.adapter.text.norm(hidden[0, rows])).float()
        for work, row in zip(picked, logits):
            state = work.state
            result = sampled[state.request_id]
            result.token = pick_token(row, state.request.sampling, len(state.output))
            if state.request.keep_logits:
                result.logits = row.cpu()
        return sampled

    def _decode_work(self, state: RequestState) -> _Work:
        layout = state.layout
        return _Work(state, 1, False, 0, True, [1] * self.num_layers, layout.layer_lengths(layout.lengths))

    def _chunk_work(self, scheduled: ScheduledWork) -> _Work:
        state, count = scheduled.state, scheduled.count
        layout = state.layout
        if not state.prompt_left:
            final = count == len(state.feed)
            return _Work(state, count, False, 0, final, [count] * self.num_layers, layout.layer_lengths(layout.lengths))
        start = state.prompt_done
        final = count == state.prompt_left
        rows, past = [], []
        for i in range(self.num_layers):
            if i < layout.cut:
                rows.append(count)
                past.append(start)
            else:  # the kept tokens go on from K once the whole prompt has reached it
                rows.append(state.kept_len if final else 0)
                past.append(0)
        return _Work(state, count, True, start, final, rows, past)

    def _inputs(self, works: list[_Work]) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer-0 input ``[1, T, hidden]`` and rotary positions ``[P, T]`` of the step's rows."""
        adapter, device = self.adapter, self.adapter.device
        ids, positions = [], []
        for work in works:
            state = work.state
            if work.is_prompt:
                prompt = state.request.prompt
                ids.append(prompt.input_ids[work.start : work.start + work.count].to(device))
                positions.append(prompt.positions[:, work.start : work.start + work.count].to(device))
            else:
                ids.append(torch.tensor(state.feed[: work.count], device=device))
                span = torch.arange(state.layout.next_position, state.layout.next_position + work.count, device=device)
                positions.append(span.expand(adapter.position_dims, -1))
        embeds = adapter.text.embed_tokens(torch.cat(ids))
        row = 0
        for work, chunk_ids in zip(works, ids):
            if work.is_prompt:
                image = chunk_ids == adapter.image_token_id
                if bool(image.any()):
                    prompt = work.state.request.prompt
                    before = int((prompt.input_ids[: work.start] == adapter.image_token_id).sum())
                    features = prompt.image_features[before : before + int(image.sum())]
                    embeds[row + image.nonzero().flatten()] = features.to(embeds)
            row += work.count
        return embeds[None], torch.cat(positions, dim=1)

    def _layer_steps(self, works: list[_Work], decodes: int) -> list[LayerStep]:
        """Each layer's slots to write and what each request attends, built once for the step."""
        size, device = self.pool.block_size, self.adapter.device
        decode_tables = decode_past = decode_slots = None
        if decodes:
            past = torch.tensor([w.past for w in works[:decodes]])  # [decodes, layers]
            width = max(1, math.ceil((int(past.max()) + 1) / size))
            decode_tables = torch.zeros(decodes, self.num_layers, width, dtype=torch.long)
            for j, work in enumerate(works[:decodes]):
                tables = work.state.layout.tables[:, :width]
                decode_tables[j, :, : tables.shape[1]] = tables
            blocks = decode_tables.gather(2, (past // size)[..., None])[..., 0]
            decode_slots = blocks * size + past % size  # [decodes, layers]
            decode_past = past
        steps = []
        for i in range(self.num_layers):
            slots = [decode_slots[:, i]] if decodes else []
            segments = []
            for work in works[decodes:]:
                count, past = work.rows[i], work.past[i]
                if not count:
                    continue
                table = work.state.layout.tables[i]
                slots.append(_slots(table, past, count, size))
                segments.append(Segment(work.row_at[i], count, past, table[: math.ceil((past + count) / size)].to(device)))
            blocks = mask = None
            if decodes:
                lengths = decode_past[:, i] + 1
                width = math.ceil(int(lengths.max()) / size)
                blocks = decode_tables[:, i, :width].to(device)
                mask = (torch.arange(width * size)[None] < lengths[:, None])[:, None, None].to(device)
            slots = torch.cat(slots) if slots else torch.empty(0, dtype=torch.long)
            steps.append(LayerStep(self.pool, self.workspace, slots.to(device), decodes, blocks, mask, segments))
        return steps

    def _cut(self, works, layer, hidden, positions, layer_input, cos_sin, sampled):
        """The rows entering ``layer``: a prompt pruned at ``layer`` goes on with the tokens it
        keeps, or, when more of it is still to come, waits for its last chunk."""
        pieces, places = [], []
        for work in works:
            start, before = work.rows_into(layer)
            if not before:
                continue
            rows = slice(start, start + before)
            if not work.cut_at(layer):
                pieces.append(hidden[0, rows])
                places.append(positions[:, rows])
            elif not work.final:
                work.state.stash.append(hidden[0, rows].clone())
            else:
                reduced, index, result = self._select(work, layer, hidden[0, rows], layer_input, cos_sin)
                sampled[work.state.request_id] = result
                pieces.append(reduced)
                places.append(work.state.request.prompt.positions[:, index.cpu()].to(positions.device))
        if not pieces:
            return hidden[:, :0], positions[:, :0]
        return torch.cat(pieces)[None], torch.cat(places, dim=1)

    def _select(self, work: _Work, layer: int, rows: torch.Tensor, layer_input, cos_sin) -> tuple[torch.Tensor, torch.Tensor, Sampled]:
        """Runs the request's pruning method on its whole prompt as layer ``layer - 1`` left it,
        or, at layer 0, on its input embeddings (whose L1 norms stand in for the keys)."""
        state = work.state
        prompt, pruning = state.request.prompt, state.request.pruning
        device = self.adapter.device
        hidden = torch.cat([*state.stash, rows])
        state.stash = []
        n = len(prompt.input_ids)
        vision = prompt.input_ids.to(device) == self.adapter.image_token_id
        if layer == 0:
            ctx = SelectionContext(hidden=hidden, normed=hidden, keys=hidden, vision=vision, last_attention_fn=_no_attention)
        else:
            keys = self._read(state.layout, layer - 1, n)[0]  # [n, kv_heads, head_dim]
            start, count = work.rows_into(layer)
            cos, sin = cos_sin
            last = start + count - 1
            ctx = SelectionContext(
                hidden=hidden,
                normed=self.adapter.text.norm(hidden),
                keys=keys.reshape(n, -1),
                vision=vision,
                last_attention_fn=partial(last_token_attention, self.adapter.layers[layer - 1], layer_input[0, last], cos[0, last], sin[0, last], keys.transpose(0, 1)),
            )
        method = get_method(pruning.method)
        times: list[float] = []
        with stopwatch(device, times):
            selections = [method(ctx, span, budget, pruning) for span, budget in zip(prompt.spans, state.budgets)]
        for span, budget, selection in zip(prompt.spans, state.budgets, selections):
            check_selection(pruning.method, span, budget, selection)
        reduced, index = reduce_rows(hidden, prompt, selections)
        kept = sorted(int(p) for s in selections for p in s.positions)
        return reduced, index, Sampled(None, kept_index=index.tolist(), kept_positions=kept, selection_s=times[0])

    def _read(self, layout: Layout, layer: int, count: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``start .. count-1`` of a layer, ``[count - start, kv_heads, head_dim]``."""
        blocks = layout.tables[layer, start // self.pool.block_size : math.ceil(count / self.pool.block_size)].to(self.adapter.device)
        shape = (-1, *self.pool.keys.shape[2:])
        first = start % self.pool.block_size
        end = first + count - start
        return self.pool.keys[blocks].view(shape)[first:end], self.pool.values[blocks].view(shape)[first:end]

    def export(self, layout: Layout, device: torch.device | None = None, start: list[int] | None = None) -> RaggedKVCache:
        """A request's cache out of the pool, as a ``RaggedKVCache`` of one; from ``start`` (slots
        per group) on, the tail a continuation added, when given."""
        device = device or self.adapter.device
        start = start or [0] * len(layout.lengths)
        keys, values = [], []
        for i in range(self.num_layers):
            k, v = self._read(layout, i, layout.layer_length(i), start[layout.group(i)])
            keys.append(k.transpose(0, 1)[None].to(device, copy=True))
            values.append(v.transpose(0, 1)[None].to(device, copy=True))
        groups = len(layout.lengths)
        return RaggedKVCache(
            keys=keys,
            values=values,
            layer_group=tuple(layout.group(i) for i in range(self.num_layers)),
            token_index=[torch.tensor([index[begin:]], dtype=torch.long, device=device) for index, begin in zip(layout.token_index[:groups], start)],
            next_position=torch.tensor([layout.next_position], device=device),
        )

    def _load(self, state: RequestState) -> None:
        """Writes the request's ``base`` cache into the blocks the scheduler gave it."""
        cache, layout = state.base, state.layout
        keys, values = self.pool.slot_view()
        device = self.adapter.device
        for i in range(self.num_layers):
            k, v = cache.keys[i][0], cache.values[i][0]  # [kv_heads, n, head_dim]
            slots = _slots(layout.tables[i], 0, k.shape[1], self.pool.block_size).to(device)
            keys.index_copy_(0, slots, k.transpose(0, 1).to(device, keys.dtype))
            values.index_copy_(0, slots, v.transpose(0, 1).to(device, values.dtype))
        state.base = None


def _no_attention() -> torch.Tensor:
    raise ValueError("no attention before the first layer: this method cannot prune at layer 0")


def _slots(table: torch.Tensor, start: int, count: int, block_size: int) -> torch.Tensor:
    """Pool slots of tokens ``start .. start+count-1`` of a layer whose blocks are ``table``."""
    index = torch.arange(start, start + count)
    return table[index // block_size] * block_size + index % block_size
