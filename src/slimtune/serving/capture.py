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
  tensor, and attention reads every column of the buffers; the mask (one additive `[slots, 1, 1, columns]`
  per kind of layer, sliding windows applied) says which columns each row sees. The free slots see only
  their own new column, so no row of the step is fully masked.
- **Positions** `[slots, 1]` follow from each row's mask, as in the eager step (less the cache columns that take
  none, `Bank.unpositioned_columns`).

What the graph reads in Python changes only when a slot table is made, grown, emptied or filled again, or the
cache grows (amortised, like an array): each such *structure* (the layout of hooks and tables, the cache's slots
and columns) has a graph of its own, and `compiles` counts them. Nothing in it depends on which users hold the
slots: a table's settings (LoRA's dropout, an adapter's activation) come from its group (`stacked_apply`), not
from one of its users, so no eviction fails the graph's guards; and the last few structures' graphs are kept,
so a table that empties and fills again (it is kept for its shape's next tuning, `Component.idle`) finds its
graph still there. A batch with a tuning that has no slot (a full
fine-tuning, a DoRA tuning outside a serving bank) takes the eager step.

**Compiles run beside the steps, not inside them.** With `background` (the engine's), a structure's graph is
compiled on a thread of its own, never on the caller's: until the graph is ready, `step()` returns None and
the engine runs those steps eagerly (the same tokens), so a tuning of a new shape or a grown cache stalls no
row, where inductor takes minutes per graph on a CPU (the steps share Python's GIL with the compile's
tracing, so they go slower while it traces, but none waits for it). One compile runs at a time; a structure
that asks meanwhile waits its turn, a newer one takes its place, and a graph finished for a structure the
bank has since left is let go (`wait()` blocks until none is running or waiting). The compile thread calls
the compiled step once, on inputs of its own with the live ones' shapes and dtypes (token ids, positions and
masks made for it, and empty KV buffers: the KV cache's size again in memory while it runs), under the
step's routing and grad modes. What makes that safe beside the running engine:

- dynamo's frame hook (its eval-frame callback), grad and inference mode and the routing that the methods'
  hooks read (`routing._LOCAL`) are per thread: the engine's eager steps go on untouched by the compile, and
  the compile's hooks see the compile's routing. The graph is run under the routing object it was traced
  with, so its guards on that routing hold in the engine's thread.
- The graph writes only the KV buffers it is given, here the scratch ones. It reads the slot tables and the
  model's parameters (and DoRA's gains, computed when a slot is written, `SlotTable.derive`) and does not
  write them.
- A tuning loaded or dropped while a compile runs changes the structure (its graph is then let go) or fails
  the trace; a structure whose compile fails twice runs eagerly from then on, with a warning.
- The engine's thread runs a graph in dynamo's run-only mode (`torch._dynamo.run`), which never compiles:
  should the graph's guards fail after all (one traced before a DoRA tuning of a layer no other had added
  that layer's gains guards on their absence), dynamo would run `_forward` as Python, which then stops before
  doing anything; that step runs eagerly, as for a structure not compiled yet, and the structure is compiled
  again.
- Each structure's graph has a code object of its own (`_own_code`): a compile never adds to the guards a
  running step reads, and dynamo's recompile limit (8 graphs per code object, then eager) is never reached.

Without `background` (`bench/`), a step waits for its structure's graph, compiled the same way (and compiled
again if its guards fail), so every step runs compiled. `compile_seconds` is the compiles' time.

On CUDA the compiled step is meant to run as a CUDA graph (`mode="reduce-overhead"`): no host
synchronisation happens inside it. The compile thread runs on a CUDA stream of its own, so that its kernels
never wait on the default stream while the engine's thread captures a graph (not yet run on a GPU).
"""

from __future__ import annotations

import threading
import time
import types
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import modules
from ..methods.slots import SlotRows
from ..routing import Routing, routed


class _NoGraph(Exception):
    """Dynamo, in run-only mode, found no graph whose guards hold for a step: it would run `_forward` as Python."""


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
    """The batch cache's buffers as the compiled model sees them (all slots, all columns): `buffers` is
    [(keys, values)] by layer."""

    def __init__(self, buffers: Sequence[tuple[torch.Tensor, torch.Tensor]], column: torch.Tensor):
        super().__init__(layers=[_Layer(keys, values, column) for keys, values in buffers])

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
                found.append((table, rows))
                self.tables.append((part, table, rows))
            self.cache[("slots", id(part), slots)] = found
            # "Has rows here", for the hooks that ask: a name the graph holds as a constant, never looked up in
            # the component's users (the tables' settings come from their groups), so no user's leaving fails it.
            self.present[part] = [(next(iter(found[0][0].slots)), None)]
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
    method's hooks were on the model would run without them. One copy per structure (and per engine) keeps their
    graphs apart, one graph to each."""
    fn = method.__func__
    _own_code.made += 1
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{_own_code.made}")
    return types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__),
                            method.__self__)


_own_code.made = 0


@dataclass
class _Graph:
    """A structure's compiled step: the routing it was traced with (it runs under this very object), and the
    graph, run in dynamo's run-only mode."""

    routing: _Routing
    run: Any
    runs: int = 0


@dataclass
class _Compile:
    """A structure to compile: its routing (the graph runs under this very object), a step's arguments for it
    but the KV buffers, of which it has the layouts, and the grad modes of the step's thread."""

    signature: tuple  # (structure of hooks and tables, slots, columns)
    routing: _Routing
    ids: torch.Tensor
    positions: torch.Tensor | None
    mask: Any
    column: torch.Tensor
    buffers: list[tuple[tuple, tuple]]  # each layer's keys' and values' (size, stride, dtype, is_inference)
    grad: bool
    inference: bool

    def inputs(self) -> tuple:
        """The step's arguments over empty scratch KV buffers of the live ones' layouts, made on the compile
        thread: the live buffers are neither read nor written, nor kept from being freed."""
        def empty(size, stride, dtype, inference):
            with torch.inference_mode(inference):
                return torch.empty_strided(size, stride, dtype=dtype, device=self.ids.device)

        kv = [(empty(*keys), empty(*values)) for keys, values in self.buffers]
        return self.ids, self.positions, self.mask, _Buffers(kv, self.column)


class CapturedStep:
    """The engine's compiled decoding step (see the module's docstring). `step()` returns None for a batch it
    does not take (a tuning without a slot) and, with `background`, for one whose graph is still compiling: the
    engine then runs the eager step."""

    keep_structures = 4  # structures of hooks and tables whose graphs are kept (see `_graphs`)

    def __init__(self, bank: Any, pad: int, backend: str = "inductor", mode: str | None = None,
                 background: bool = False, on_compile: Callable[[], None] | None = None):
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
        self.background = background
        self.on_compile = on_compile  # called on the compile thread after each compile (the engine's stats)
        # The graphs of the last `keep_structures` structures of hooks and tables, by signature (that structure,
        # slots, columns). A structure comes back: a table whose last tuning leaves is kept for the next one of its
        # shape (`Component.idle`), so the structure before it emptied is the structure once it fills again. Each
        # graph holds its structure's tables (hence their ids stay theirs); older structures' graphs are let go.
        self._graphs: dict[tuple, _Graph] = {}
        self._structure: tuple | None = None  # of the last step
        self._recent: list[tuple] = []  # the structures whose graphs are kept, the last step's last
        self._failed: Counter = Counter()  # signature -> compiles that gave no graph, or one that never ran
        self._changed = threading.Condition()  # guards what follows, and says when a compile is done
        self._queued: _Compile | None = None  # the newest structure waiting for its compile
        self._compiling: tuple | None = None  # the signature being compiled
        self._thread: threading.Thread | None = None
        self._closed = False
        self.compiles = 0  # graphs made (batch shapes and slot-table layouts seen)
        self.compile_seconds = 0.0  # spent making them
        self.graph_breaks = 0  # while making them (0: each step is one graph)
        self.steps = 0  # run compiled
        self.eager_steps = 0  # run eagerly while their structure's graph was not ready (compiling, or unfit)

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
        if not torch.compiler.is_compiling():  # run-only mode found no graph for these inputs: see `_run`
            raise _NoGraph
        inputs = {"input_ids": ids, "attention_mask": mask}
        if positions is not None:
            inputs["position_ids"] = positions
        return self.model(**inputs, **self.bank._cached(cache)).logits[:, -1]

    def _masks(self, seen: torch.Tensor, slot_cache: Any) -> Any:
        """`seen` [rows, window + 1]: which of the window's columns and the new one each row sees; returns the
        mask over every slot and column of the buffers (a dict by layer kind when some layers slide), additive
        (0 where a row sees a column, the dtype's lowest where not), as every attention implementation takes it
        (eager attention adds the mask to the scores: a boolean one would be added as 0 and 1)."""
        slots, columns = slot_cache.capacity
        start, end, rows = slot_cache.start, slot_cache.end, slot_cache.rows
        full = torch.zeros(slots, columns, dtype=torch.bool, device=seen.device)
        full[:rows, start:end + 1] = seen.bool()
        full[rows:, end] = True  # free slots: their own column only
        full = full[:, None, None, :]
        if self.window is None:
            return self._additive(full)
        near = torch.arange(columns, device=seen.device) > end - self.window
        sliding = full & near
        if self.layer_types is None:
            return self._additive(sliding)
        return {kind: self._additive(sliding if kind == "sliding_attention" else full) for kind in self.layer_types}

    def _additive(self, sees: torch.Tensor) -> torch.Tensor:
        dtype = self.model.dtype
        return torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(~sees, torch.finfo(dtype).min)

    def _inputs(self, routing: _Routing, last: torch.Tensor, seen: torch.Tensor, users: Sequence[str | None],
                slot_cache: Any) -> tuple:
        """The compiled step's arguments for this batch, `routing` pointed at its rows (all tensors)."""
        slots = slot_cache.capacity[0]
        rows, device = len(users), last.device
        routing.point(users)
        ids = torch.full((slots, 1), self.pad, dtype=torch.long, device=device)
        ids[:rows] = last
        positions = None
        if self.takes_positions:
            positions = torch.zeros(slots, 1, dtype=torch.long, device=device)
            positions[:rows, 0] = (seen[:, :-1].long().sum(1) - self.bank.unpositioned_columns(users, device)
                                  + self.bank._first_position)
        column = torch.tensor([slot_cache.end], device=device)
        buffers = [(layer.k_buf, layer.v_buf) for layer in slot_cache.layers]
        return ids, positions, self._masks(seen, slot_cache), _Buffers(buffers, column)

    def step(self, last: torch.Tensor, seen: torch.Tensor, users: Sequence[str | None], slot_cache: Any):
        """One decoding step over the running rows (`last` [rows, 1], `seen` as `_masks` takes it): their
        next-token logits [rows, vocab], with the new column written into the cache; None if not taken, or (with
        `background`) while this batch shape's graph is compiling."""
        if not self.takes(users):
            return None
        structure = _Routing.structure(self.bank)
        signature = (structure, *slot_cache.capacity)
        with self._changed:
            if structure != self._structure:  # another layout of hooks and tables: keep the last few's graphs
                self._structure = structure
                self._recent = [*(s for s in self._recent if s != structure), structure][-self.keep_structures:]
                self._graphs = {s: graph for s, graph in self._graphs.items() if s[0] in self._recent}
                self._failed = Counter({s: n for s, n in self._failed.items() if s[0] in self._recent})
        logits = None
        for _ in range(2):  # a graph whose guards fail is compiled again at once
            graph = self._graph(signature, last, seen, users, slot_cache)
            if graph is None:
                break
            logits = self._run(graph, signature, last, seen, users, slot_cache)
            if logits is not None:
                break
        if logits is None and self._failed[signature] < 2:  # (one that cannot be compiled just runs eagerly)
            self.eager_steps += 1
        return logits

    def _graph(self, signature: tuple, last: torch.Tensor, seen: torch.Tensor, users: Sequence[str | None],
               slot_cache: Any) -> _Graph | None:
        """This batch shape's graph; if there is none, it is compiled on the compile thread and (with `background`)
        None is returned meanwhile."""
        with self._changed:
            graph = self._graphs.get(signature)
        if graph is not None or self._failed[signature] >= 2:
            return graph
        self._queue(signature, last, seen, users, slot_cache)
        if self.background:
            return None
        self.wait()
        return self._graphs.get(signature)

    def _run(self, graph: _Graph, signature: tuple, last: torch.Tensor, seen: torch.Tensor,
             users: Sequence[str | None], slot_cache: Any) -> torch.Tensor | None:
        """The step through `graph`; None, with nothing run, if its guards fail (it is then let go)."""
        args = self._inputs(graph.routing, last, seen, users, slot_cache)
        try:
            with routed(graph.routing):
                logits = graph.run(*args)
        except _NoGraph:
            with self._changed:
                self._graphs.pop(signature, None)
                self._failed[signature] += not graph.runs  # a graph that never matched here may never
            return None
        slot_cache.wrote(1)
        graph.runs += 1
        self.steps += 1
        return logits[:len(users)]

    def _queue(self, signature: tuple, last: torch.Tensor, seen: torch.Tensor, users: Sequence[str | None],
               slot_cache: Any) -> None:
        """Have this batch shape compiled on the compile thread (once: a compile running or queued for it is
        waited for), in place of any other still waiting."""
        with self._changed:
            if self._closed or signature in self._graphs or signature in (self._compiling,
                                                                           getattr(self._queued, "signature", None)):
                return
        routing = _Routing(self.bank, slot_cache.capacity[0], last.device)
        ids, positions, mask, live = self._inputs(routing, last, seen, users, slot_cache)
        # All made afresh for the compile but `live`, over the engine's KV buffers: of those only the layouts go.
        layouts = [tuple((t.shape, t.stride(), t.dtype, t.is_inference()) for t in (layer.keys, layer.values))
                   for layer in live.layers]
        job = _Compile(signature, routing, ids, positions, mask, live.layers[0].column, layouts,
                       torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        with self._changed:
            self._queued = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._compile_queued, name="slimtune-compile", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def _compile_queued(self) -> None:
        """The compile thread: compile what is queued, one at a time, until closed."""
        while True:
            with self._changed:
                while self._queued is None and not self._closed:
                    self._changed.wait()
                if self._closed:
                    self._thread = None
                    self._changed.notify_all()
                    return
                job, self._queued = self._queued, None
                self._compiling = job.signature
            graph = self._compile(job)
            with self._changed:
                if graph is not None and job.signature[0] in self._recent:
                    self._graphs[job.signature] = graph
                self._compiling = None
                self._changed.notify_all()
            if self.on_compile is not None:
                self.on_compile()

    def _compile(self, job: _Compile) -> _Graph | None:
        """Compile `job`'s structure by running it once on scratch inputs; its graph, or None if none was made."""
        compiled = torch.compile(_own_code(self._forward), backend=self.backend, mode=self.mode, dynamic=False)
        counters = torch._dynamo.utils.counters
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        device = job.ids.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        began = time.perf_counter()
        failure = None
        try:
            with (torch.inference_mode(job.inference), torch.set_grad_enabled(job.grad), torch.cuda.stream(stream),
                  routed(job.routing)):
                compiled(*job.inputs())
        except _NoGraph:  # dynamo ran the step as Python: it made no graph
            pass
        except Exception as err:  # the trace or the backend failed: these rows run eagerly, no row fails for it
            failure = f"{type(err).__name__}: {err}"
        made = counters["stats"]["unique_graphs"] - graphs
        self.compiles += made
        self.compile_seconds += time.perf_counter() - began
        self.graph_breaks += sum(counters["graph_break"].values()) - breaks
        if failure is None and made:
            return _Graph(job.routing, torch._dynamo.run(compiled))
        with self._changed:
            self._failed[job.signature] += 1
            failures = self._failed[job.signature]
        if failures >= 2:
            warnings.warn(f"the compiled decoding step could not be compiled for {job.signature[1]} slots and "
                          f"{job.signature[2]} columns ({failure or 'dynamo made no graph'}): those steps run "
                          "eagerly", RuntimeWarning, stacklevel=1)
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no compile is running or queued (or `timeout` seconds passed): whether none is."""
        with self._changed:
            return self._changed.wait_for(lambda: self._queued is None and self._compiling is None, timeout)

    def close(self, wait: bool = True) -> None:
        """Compile nothing more (what is queued is dropped); with `wait`, until the running compile ends."""
        with self._changed:
            self._closed, self._queued = True, None
            thread = self._thread
            self._changed.notify_all()
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def explain(self, last: torch.Tensor, seen: torch.Tensor, users: Sequence[str | None], slot_cache: Any):
        """`torch._dynamo.explain` of the step for this batch (graphs, graph breaks and their reasons, ops); the
        cache is left as it was."""
        routing = _Routing(self.bank, slot_cache.capacity[0], last.device)
        args = self._inputs(routing, last, seen, users, slot_cache)
        saved = [(layer.k_buf.clone(), layer.v_buf.clone()) for layer in slot_cache.layers]
        try:
            with routed(routing):
                return torch._dynamo.explain(self._forward)(*args)
        finally:
            for layer, (k, v) in zip(slot_cache.layers, saved, strict=True):
                layer.k_buf.copy_(k)
                layer.v_buf.copy_(v)
