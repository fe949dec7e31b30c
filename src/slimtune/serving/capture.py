"""A decoding step that `torch.compile` captures whole: one graph per batch shape, whatever the mix of users.

An eager step builds each batch's routing in Python (which rows are whose, per method), and every hook reads
it. A compiled graph must not depend on such Python values, or it is recompiled whenever a row joins or
leaves. Here everything that changes from step to step is a tensor written in place before the step, and
everything the graph reads in Python stays the same from one step to the next:

- **Rows.** The step runs every slot of the batch's KV cache (`serving.kv`), free ones too, so the batch
  size is the cache's slot count: 8, 16, 32, ... up to the engine's `max_batch`, as the cache grows.
- **Tunings.** Every slot table of every method (`methods.slots`) runs on every row, each row reading its
  own slot (slot 0, which changes nothing, where the row is not that table's). The row → slot index of each
  table is rewritten before each step. Prefix and prompt tunings are keys and values in the cache after
  prefill (`Component.lives_in_cache`), so their rows need nothing here.
- **The cache.** Each layer's new keys and values are written with `index_copy_` at one column, given as a
  tensor, and attention reads every column of the buffers; the mask (one boolean `[slots, 1, 1, columns]`
  per kind of layer, sliding windows applied) says which columns each row sees. The free slots see only
  their own new column, so no row of the step is fully masked.
- **Positions** `[slots, 1]` follow from each row's mask, as in the eager step.

What the graph reads in Python changes only when a slot table is made, grown or dropped, or the cache grows
(amortised, like an array); those recompile, and `compiles` counts them. A batch with a tuning that has no
slot (a full fine-tuning, a DoRA tuning outside a serving bank) takes the eager step.

On CUDA the compiled step is meant to run as a CUDA graph (`mode="reduce-overhead"`): no host
synchronisation happens inside it.
"""

from __future__ import annotations

import time
import types
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import modules
from ..methods.slots import SlotRows
from ..routing import Routing, routed


class _Layer(CacheLayerMixin):
    """One layer: the cache's full buffers, written at `column`."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.column = keys, values, column
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # the buffers exist already
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[2]

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.keys.shape[2], 0


class _Buffers(Cache):
    """The batch cache's buffers as the compiled model sees them (all slots, all columns)."""

    def __init__(self, slot_cache: Any, column: torch.Tensor):
        super().__init__(layers=[_Layer(layer.k_buf, layer.v_buf, column) for layer in slot_cache.layers])

    @property
    def is_compileable(self) -> bool:
        return True


class _Routing(Routing):
    """A routing whose Python structure is fixed: each method with slot tables has all its tables, each over
    every row (`SlotRows(every=True)`), and their row → slot indices are tensors rewritten before each step."""

    def __init__(self, bank: Any, slots: int, device: torch.device):
        super().__init__([None] * slots, {}, device, keep_layout=True)
        self.present: dict[Any, list] = {}  # component -> [(one of its users, None)]: "has rows here"
        self.tables = []  # (component, table, SlotRows)
        for part in bank.parts.values():
            if not part.tables or part.lives_in_cache:
                continue
            self.components.append(part)
            found = []
            for table in part.tables.values():
                rows = SlotRows(table, [0] * slots, device, keep=False, every=True)
                found.append((table, next(iter(table.slots)), rows))
                self.tables.append((part, table, rows))
            self.cache[("slots", id(part), slots)] = found
            self.present[part] = [(found[0][1], None)]
        self.key = self.structure(bank)

    @staticmethod
    def structure(bank: Any) -> tuple:
        """What this routing was built from (the hooks on the model, the tables and their sites): when it changes,
        build another, and compile another step."""
        return tuple((id(part), len(part._handles), group, id(table), table.capacity, id(table.values),
                      tuple(table.tensors))
                     for part in bank.parts.values() if part.tables and not part.lives_in_cache
                     for group, table in part.tables.items())

    def groups(self, component, batch: int | None = None):
        return self.present.get(component, [])

    def point(self, users: Sequence[str | None]) -> None:
        """Each row's slot in each table for this step (free rows: slot 0)."""
        for part, table, rows in self.tables:
            index = table.index([None if u is None or part.skips(u) else u for u in users])
            index += [0] * (rows.index.shape[0] - len(index))
            rows.index.copy_(torch.tensor(index))


def _own_code(method):
    """`method` with a code object of its own. torch.compile keeps graphs per code object and does not guard on
    the hooks of the model's modules (`torch._dynamo.config.skip_nnmodule_hook_guards`): a graph traced before a
    method's hooks were on the model would run without them. One copy per layout of hooks and tables (and per
    engine) keeps their graphs apart."""
    fn = method.__func__
    _own_code.made += 1
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{_own_code.made}")
    return types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__),
                            method.__self__)


_own_code.made = 0


class CapturedStep:
    """The engine's compiled decoding step (see the module's docstring). `step()` returns None for a batch it
    does not take (a tuning without a slot): the engine then runs the eager step."""

    def __init__(self, bank: Any, pad: int, backend: str = "inductor", mode: str | None = None):
        self.bank = bank
        self.pad = pad
        self.model = bank.model
        config = modules.text_config(self.model)
        types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        self.layer_types = sorted(set(types)) if types and "sliding_attention" in types else None
        self.window = window if self.layer_types or (window and getattr(config, "use_sliding_window", True)) else None
        self.takes_positions = bank._takes_positions
        self.backend, self.mode = backend, mode
        # The compiled step of the current routing structure: an older structure names tables since dropped or
        # regrown, so it does not come back, and its graphs are let go.
        self._compiled: tuple[tuple, Any] | None = None
        self._routing: _Routing | None = None
        self.compiles = 0  # graphs made (batch shapes and slot-table layouts seen)
        self.compile_seconds = 0.0  # spent in the steps that made them
        self.graph_breaks = 0  # while making them (0: each step is one graph)
        self.steps = 0

    def takes(self, users: Sequence[str | None]) -> bool:
        """Whether every row's tuning runs from slot tables (or lives in the cache) in a decoding step."""
        for user in dict.fromkeys(users):
            if user is None:
                continue
            for part in self.bank._parts_of(user):
                if not part.lives_in_cache and not part.skips(user) and part.slot_group(user) is None:
                    return False
        return True

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor | None, mask: Any, cache: Cache) -> torch.Tensor:
        inputs = {"input_ids": ids, "attention_mask": mask}
        if positions is not None:
            inputs["position_ids"] = positions
        return self.model(**inputs, **self.bank._cached(cache)).logits[:, -1]

    def _masks(self, seen: torch.Tensor, slot_cache: Any) -> Any:
        """`seen` [rows, window + 1]: which of the window's columns and the new one each row sees; returns the
        mask over every slot and column of the buffers (a dict by layer kind when some layers slide)."""
        slots, columns = slot_cache.capacity
        start, end, rows = slot_cache.start, slot_cache.end, slot_cache.rows
        full = torch.zeros(slots, columns, dtype=torch.bool, device=seen.device)
        full[:rows, start:end + 1] = seen.bool()
        full[rows:, end] = True  # free slots: their own column only
        full = full[:, None, None, :]
        if self.window is None:
            return full
        near = torch.arange(columns, device=seen.device) > end - self.window
        sliding = full & near
        if self.layer_types is None:
            return sliding
        return {kind: sliding if kind == "sliding_attention" else full for kind in self.layer_types}

    def _inputs(self, last: torch.Tensor, seen: torch.Tensor, users: Sequence[str | None], slot_cache: Any):
        """The compiled step's routing and arguments for this batch (everything that changes is a tensor)."""
        slots = slot_cache.capacity[0]
        rows, device = len(users), last.device
        key = _Routing.structure(self.bank)
        if self._routing is None or self._routing.key != key or len(self._routing.users) != slots:
            self._routing = _Routing(self.bank, slots, device)
        self._routing.point(users)
        ids = torch.full((slots, 1), self.pad, dtype=torch.long, device=device)
        ids[:rows] = last
        positions = None
        if self.takes_positions:
            positions = torch.zeros(slots, 1, dtype=torch.long, device=device)
            positions[:rows, 0] = seen[:, :-1].long().sum(1)
        column = torch.tensor([slot_cache.end], device=device)
        return self._routing, (ids, positions, self._masks(seen, slot_cache), _Buffers(slot_cache, column))

    def step(self, last: torch.Tensor, seen: torch.Tensor, users: Sequence[str | None], slot_cache: Any):
        """One decoding step over the running rows (`last` [rows, 1], `seen` as `_masks` takes it): their
        next-token logits [rows, vocab], with the new column written into the cache; None if not taken."""
        if not self.takes(users):
            return None
        routing, args = self._inputs(last, seen, users, slot_cache)
        counters = torch._dynamo.utils.counters
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        began = time.perf_counter()
        if self._compiled is None or self._compiled[0] != routing.key:  # a new layout of hooks and tables
            self._compiled = (routing.key, torch.compile(_own_code(self._forward), backend=self.backend,
                                                         mode=self.mode, dynamic=False))
        compiled = self._compiled[1]
        with routed(routing):
            logits = compiled(*args)
        made = counters["stats"]["unique_graphs"] - graphs
        if made:
            self.compiles += made
            self.compile_seconds += time.perf_counter() - began
            self.graph_breaks += sum(counters["graph_break"].values()) - breaks
        slot_cache.wrote(1)
        self.steps += 1
        return logits[:len(users)]

    def explain(self, last: torch.Tensor, seen: torch.Tensor, users: Sequence[str | None], slot_cache: Any):
        """`torch._dynamo.explain` of the step for this batch (graphs, graph breaks and their reasons, ops); the
        cache is left as it was."""
        routing, args = self._inputs(last, seen, users, slot_cache)
        saved = [(layer.k_buf.clone(), layer.v_buf.clone()) for layer in slot_cache.layers]
        try:
            with routed(routing):
                return torch._dynamo.explain(self._forward)(*args)
        finally:
            for layer, (k, v) in zip(slot_cache.layers, saved, strict=True):
                layer.k_buf.copy_(k)
                layer.v_buf.copy_(v)
