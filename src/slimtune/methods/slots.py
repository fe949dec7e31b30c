"""Slot tables: the resident tunings of one method and shape, stacked in preallocated tensors per site.

As vLLM's LoRA path keeps one `[max_loras, ...]` tensor per layer and a per-token slot index, a
`SlotTable` keeps, for every site of a group of same-shaped tunings (LoRA of one rank, adapters of one
width, all BitFit or IA3 tunings of a model), one tensor `[slots, ...]` per parameter. A batch then
needs only a row → slot index; each site gathers its rows' parameters from the table, whatever the
mix of users, with no per-layout copies kept between calls.

Slot 0 holds the method's null tuning (zeros for an additive update, ones for IA3's scales): rows of the
base model, of other methods, of a merged tuning or of a user without this site take slot 0 and get
exactly their frozen output, with no branch per row.

A user's parameters are views of their slot (`param.data` is `table[slot]`): an optimizer step or a
load writes the table in place, so inference reads the table with no bookkeeping of changes. Training
reads the parameters themselves, so each user's gradient still comes only from their own rows; an
optimizer's state is per parameter, hence per user, as before. A removed user's parameters get
storage of their own again, so a slot can be reused without touching a tuning someone still holds.

A table's tensors are what a compiled decoding step's graph reads (`serving.capture`): a table made with room
for as many users as it will hold (`slots`, an engine's `max_resident`) is never reallocated, so its graph
stays; one made without grows by a quarter when full, each growth a copy of every slot and a new graph. What
is computed from a tuning rather than held in its slot (DoRA's gains) is computed when the slot is written
(`derive`), so serving steps read it as they read the slots, and never make a table of their own.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Hashable, Iterable, Sequence

import torch
from torch import nn


def _give_back_freed_memory() -> None:
    """Return the old tables' freed memory to the system (glibc keeps freed blocks of up to 32 MB in its heap, and
    tables that grow leave one of every size behind); elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


Derive = Callable[[str], dict[Hashable, tuple[torch.Tensor, float]]]


class SlotTable:
    """One group's tables: `tensors[site][i]` is `[capacity + 1, *shape of the i-th parameter]`, and `values`
    `[capacity + 1, n]` holds numbers of each tuning that are not parameters (LoRA's scale), 0 in slot 0.

    `slots`: room for that many users from the start (the tensors are made at the first `add`); beyond it the
    table grows by a quarter. `derive(user)`: values computed from a user's tuning, {key: (value, null)}, each
    kept in `derived[key]`, a `[capacity + 1, *value's shape]` table with `null` in the slots of users without
    it; computed when a slot is written (`add`, `rebuild`, `rederive`), for a bank whose tunings change only by
    add and remove."""

    def __init__(self, nulls: Sequence[float], derive: Derive | None = None, slots: int = 0, group: Hashable = None):
        self.nulls = tuple(nulls)  # the value of slot 0, for each parameter of a site
        self.group = group  # what its tunings share (`Component.slot_group`): the settings `stacked_apply` reads
        self.derive = derive
        self.capacity = slots  # slots for users, besides slot 0
        self.slots: dict[str, int] = {}
        self.free: list[int] = list(range(slots, 0, -1))
        self.tensors: dict[str, list[torch.Tensor]] = {}
        self.links: dict[str, dict[str, tuple[nn.Parameter, ...]]] = {}  # user -> site -> the parameters of the slot
        self.numbers: dict[str, tuple[float, ...]] = {}
        self.values: torch.Tensor | None = None
        self.generation = 0  # changes whenever a slot is written: what was gathered from the tables is stale
        self.layout: tuple | None = None  # the batch layout whose gathered parameters are `kept`, by site
        self.kept: dict[tuple[str, bool], tuple[torch.Tensor, ...]] = {}
        self.derived: dict[Hashable, tuple[torch.Tensor, float]] = {}  # key -> (table, null): see `derive`

    @property
    def nbytes(self) -> int:
        """The tables' bytes (the numbers' and the derived values' too): slots × one tuning, whatever the batches
        served."""
        return sum(t.numel() * t.element_size() for t in self._all())

    def _all(self) -> list[torch.Tensor]:
        values = [] if self.values is None else [self.values]
        return [*values, *(t for ts in self.tensors.values() for t in ts), *(t for t, _ in self.derived.values())]

    @property
    def kept_bytes(self) -> int:
        """The bytes of the parameters gathered for the last batch layout (see `SlotRows.params`)."""
        return sum(t.numel() * t.element_size() for ts in self.kept.values() for t in ts)

    def _changed(self) -> None:
        self.generation += 1
        self.layout, self.kept = None, {}

    def add(self, user: str, sites: dict[str, tuple[nn.Parameter, ...]], numbers: tuple[float, ...] = ()) -> None:
        """Give `user` a slot, write their parameters at each site into it and make them views of it."""
        self._writable()
        self._changed()
        if not self.free:  # grow by a quarter: amortised copies, and at most a quarter of the slots idle
            self.rebuild(self.capacity + max(4, self.capacity // 4))
            _give_back_freed_memory()
        slot = self.free.pop()
        self.slots[user] = slot
        self.links[user] = sites
        self.numbers[user] = numbers
        with torch.no_grad():
            if self.values is None:
                like = next(iter(sites.values()))[0]
                self.values = torch.zeros(self.capacity + 1, len(numbers), dtype=like.dtype, device=like.device)
            self.values[slot] = torch.tensor(numbers, dtype=self.values.dtype)
            for name, params in sites.items():
                if name not in self.tensors:
                    self.tensors[name] = [self._new(p, null) for p, null in zip(params, self.nulls, strict=True)]
                for table, p in zip(self.tensors[name], params, strict=True):
                    table[slot].copy_(p)
                    p.data = table[slot]
            self._derive(user)

    def _derive(self, user: str) -> None:
        """Write `derive(user)` into the user's slot of each derived table (made at its first value)."""
        if self.derive is None:
            return
        slot = self.slots[user]
        with torch.no_grad():
            for key, (value, null) in self.derive(user).items():
                if key not in self.derived:
                    full = torch.full((self.capacity + 1, *value.shape), null, dtype=value.dtype, device=value.device)
                    self.derived[key] = (full, null)
                self.derived[key][0][slot] = value

    def rederive(self) -> None:
        """Compute every user's derived values again (what they are computed from changed: DoRA's weights, merged)."""
        self._writable()
        for user in self.slots:
            self._derive(user)

    def remove(self, user: str) -> None:
        """Free `user`'s slot: their parameters get their own storage back, the slot is reset to the null tuning."""
        self._writable()
        self._changed()
        slot = self.slots.pop(user)
        del self.numbers[user]
        with torch.no_grad():
            self.values[slot] = 0
            for params in self.links.pop(user).values():
                for p in params:
                    p.data = p.data.clone()
            for ts in self.tensors.values():
                for table, null in zip(ts, self.nulls, strict=True):
                    table[slot].fill_(null)
            for table, null in self.derived.values():
                table[slot].fill_(null)
        self.free.append(slot)

    def rebuild(self, capacity: int | None = None, links: dict[str, dict[str, tuple[nn.Parameter, ...]]] | None = None) -> None:
        """Make the tables afresh from the users' parameters (`links`: the users' parameters by site, given anew
        after `Module.to()`, which gives parameters new storage), on their device and dtype and with room for
        `capacity` users."""
        links = self.links if links is None else links
        numbers = self.numbers
        self._changed()
        self.capacity = max(capacity or 0, self.capacity)
        self.slots, self.links, self.tensors, self.numbers, self.values, self.derived = {}, {}, {}, {}, None, {}
        self.free = list(range(self.capacity, 0, -1))
        for user, sites in links.items():
            self.add(user, sites, numbers[user])

    def _writable(self) -> None:
        """Tables made in inference mode (an engine loading tunings) can be written only there: outside it, copy
        them into ordinary tensors first."""
        if torch.is_inference_mode_enabled() or self.values is None:
            return
        if any(t.is_inference() for t in self._all()):
            self.rebuild()

    def _new(self, like: torch.Tensor, null: float) -> torch.Tensor:
        return torch.full((self.capacity + 1, *like.shape), null, dtype=like.dtype, device=like.device)

    def index(self, users: Iterable[str | None]) -> list[int]:
        """Each row's slot (0 for a row that is not one of this table's users)."""
        return [self.slots.get(user, 0) for user in users]


class RowParams:
    """Each row's parameters at one site, as a method's `stacked_apply` uses them: `matmul(x, i)` is every row of
    `x` times its own i-th parameter (a matrix [out, in], as `nn.Linear` keeps its weight) transposed, `vector(i)`
    each row's own i-th parameter, `numbers[j]` each row's j-th `slot_numbers` [rows]. Gathered by row: from the
    users' own parameters in training (so gradient flows back to each), from the slot tables in inference."""

    def __init__(self, tensors: Sequence[torch.Tensor], numbers: Sequence[torch.Tensor] = ()):
        self.tensors, self.numbers = tuple(tensors), tuple(numbers)

    def matmul(self, x: torch.Tensor, i: int) -> torch.Tensor:
        w = self.tensors[i]
        if x.dtype != w.dtype:
            x = x.to(w.dtype)
        if x.dim() == 3:  # [rows, tokens, in]: as bmm takes it (each op counts in a launch-bound step)
            return torch.bmm(x, w.transpose(1, 2))
        return torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), w.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[1])

    def vector(self, i: int) -> torch.Tensor:
        return self.tensors[i]


class SlotRows:
    """One table's rows of a batch: `index` [batch] each row's slot (0: not one of the table's users); `rows` the
    rows that are its users' (None: every row), and `own` their slots."""

    def __init__(self, table: SlotTable, index: list[int], device: torch.device, keep: bool, every: bool = False):
        self.table = table
        self.index = torch.tensor(index, device=device)
        own = [i for i, slot in enumerate(index) if slot]
        self.rows = None if every or len(own) == len(index) else torch.tensor(own, device=device)
        self.own = self.index if self.rows is None else torch.tensor([index[i] for i in own], device=device)
        self.layout = (tuple(index), table.generation)
        self.keep = keep
        # `every` (a captured decoding step's rows, `serving.capture`): all rows, whatever their slot, and `index`
        # is rewritten in place before each step; nothing is stored while the step runs.
        self.every = every
        self._numbers: dict[bool, tuple[torch.Tensor, ...]] = {}

    def params(self, name: str, own: bool = False) -> RowParams:
        """The parameters at one site of every row (`own`: of `rows` only), gathered from its tables. With `keep`
        (a bank whose tunings change only through add and remove, as an engine's), what one batch layout gathered
        is kept for the next calls with the same rows (decoding steps), in place of what the last layout kept:
        one layout's copy at most."""
        table, index = self.table, self.own if own else self.index
        if self.every:
            numbers = tuple(table.values.index_select(0, index).unbind(1)) if table.values.shape[1] else ()
            return RowParams([t.index_select(0, index) for t in table.tensors[name]], numbers)
        if own not in self._numbers:  # once per batch, not once per site
            self._numbers[own] = tuple(table.values.index_select(0, index).unbind(1)) if table.values.shape[1] else ()
        numbers = self._numbers[own]
        if not self.keep:
            return RowParams([t.index_select(0, index) for t in table.tensors[name]], numbers)
        if table.layout != self.layout:
            table.layout, table.kept = self.layout, {}
        if (name, own) not in table.kept:
            table.kept[name, own] = tuple(t.index_select(0, index) for t in table.tensors[name])
        return RowParams(table.kept[name, own], numbers)
