"""The running batch's KV cache: one preallocated buffer per layer, a slot per row.

Joining fresh rows to the batch by concatenating caches copies every running row's keys and values at each
admission, dropping a finished row by index-selecting copies them again, and a transformers
`DynamicCache` concatenates each layer at every decoding step. Here each layer's keys and values live in
buffers `[slots, kv_heads, capacity, head_dim]`: row i of the batch is slot i, and the batch's columns
are a window `[start, end)` of the buffer, right-aligned as the engine's left-padded masks are (each
row's newest token in column end - 1). So

- a decoding step writes one column of each layer in place;
- admitting rows writes only their own slots (their prompt's columns end at `end`), unless a prompt is
  longer than the window can hold on its left: then, and when the buffer is full, it is laid out afresh
  into a larger one (counted in `relayouts`: amortised, as a growing array's);
- a finished row frees its slot: the batch's last row moves into it (one row's copy), and the window's
  start moves past columns that no remaining row sees, without copying.

A slot is zeroed when its row leaves, and new buffers are zero, so a masked column holds zeros or its own
row's padding: never what an earlier row (or a tuning that produced NaN) left there.

The layers are transformers cache layers (`DynamicLayer`, whose `keys`/`values` are views of the window),
so the model's attention and mask code see an ordinary cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

GROW_COLUMNS = 64  # room added past what is needed when a buffer is laid out afresh (at least doubling)
MIN_SLOTS = 8  # rows of the first buffers (then doubling, up to the engine's max_batch)
KEEP_IDLE_BYTES = 256 << 20  # buffers kept while the batch is empty, if no larger (none to allocate at its next start)


class SlotLayer(DynamicLayer):
    """One layer's buffers; `keys`/`values` are the batch's window of them."""

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """The model's step: its new columns written in place after the window (room was reserved)."""
        o = self.owner
        end = o.end + key_states.shape[2]
        self.k_buf[:o.rows, :, o.end:end] = key_states
        self.v_buf[:o.rows, :, o.end:end] = value_states
        self.keys = self.k_buf[:o.rows, :, o.start:end]
        self.values = self.v_buf[:o.rows, :, o.start:end]
        if self is o.layers[-1]:  # every layer has its new columns
            o.end = end
        return self.keys, self.values

    def view(self) -> None:
        o = self.owner
        self.keys = self.k_buf[:o.rows, :, o.start:o.end]
        self.values = self.v_buf[:o.rows, :, o.start:o.end]
        self.is_initialized = True


class SlotCache(Cache):
    """The running batch's cache (see the module's docstring). `rows` rows, columns `[start, end)`."""

    def __init__(self, fresh: DynamicCache, max_rows: int):
        super().__init__(layers=[SlotLayer(self) for _ in fresh.layers])
        self._fresh_shapes = [(layer.keys.shape[1], layer.keys.shape[3], layer.keys.dtype, layer.keys.device)
                              for layer in fresh.layers]
        self.max_rows = max_rows
        self.rows, self.start, self.end = 0, 0, 0
        self.relayouts = 0
        self.join(fresh)

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def capacity(self) -> tuple[int, int]:
        """(slots, columns) of the buffers."""
        buf = self.layers[0].k_buf
        return (0, 0) if buf is None else (buf.shape[0], buf.shape[2])

    def bytes(self) -> int:
        return sum(layer.k_buf.numel() * layer.k_buf.element_size() * 2 for layer in self.layers
                   if layer.k_buf is not None)

    def join(self, fresh: DynamicCache) -> None:
        """Append a freshly prefilled cache's rows (left-padded, right-aligned) as the batch's last rows."""
        new, width = fresh.layers[0].keys.shape[0], fresh.layers[0].keys.shape[2]
        slots, columns = self.capacity
        if self.rows + new > slots or width > self.end:
            self._relayout(self.rows + new, left=max(0, width - self.width), room=0)
        first = self.end - width
        for layer, source in zip(self.layers, fresh.layers, strict=True):
            layer.k_buf[self.rows:self.rows + new, :, first:self.end] = source.keys
            layer.v_buf[self.rows:self.rows + new, :, first:self.end] = source.values
            # A captured step (`serving.capture`) runs every slot, free ones too, writing their columns.
            layer.k_buf[self.rows:self.rows + new, :, :first].zero_()
            layer.v_buf[self.rows:self.rows + new, :, :first].zero_()
        self.rows += new
        self.start = min(self.start, first) if self.rows > new else first
        self._view()

    def wrote(self, columns: int = 1) -> None:
        """A step wrote `columns` new columns into every layer's buffers after the window (`serving.capture`)."""
        self.end += columns
        self._view()

    def reserve(self, columns: int) -> int:
        """Room for `columns` more columns in every layer (before a step); returns the mark to `rewind` to."""
        if self.end + columns > self.capacity[1]:
            self._relayout(self.rows, left=0, room=columns)
        return self.end

    def rewind(self, mark: int) -> None:
        """Forget the columns written after `mark` (a step that failed part of the way through the layers)."""
        for layer in self.layers:
            layer.k_buf[:, :, mark:].zero_()
            layer.v_buf[:, :, mark:].zero_()
        self.end = mark
        self._view()

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only these rows (indices into the batch); each freed slot takes the batch's last row. Returns the
        batch's new order, as the old indices of its rows."""
        order = list(range(self.rows))
        kept = set(rows)
        holes = [i for i in range(len(rows)) if i not in kept]  # freed slots the kept rows will fill
        movers = [i for i in range(len(rows), self.rows) if i in kept]
        for hole, mover in zip(holes, movers, strict=True):
            for layer in self.layers:
                layer.k_buf[hole] = layer.k_buf[mover]
                layer.v_buf[hole] = layer.v_buf[mover]
            order[hole] = mover
        for layer in self.layers:
            layer.k_buf[len(rows):self.rows].zero_()
            layer.v_buf[len(rows):self.rows].zero_()
        self.rows = len(rows)
        if not rows:
            self.start = self.end  # an empty window: the next rows set its width
        self._view()
        return order[:len(rows)]

    def trim_left(self, columns: int) -> None:
        """No row sees the window's first `columns` columns: drop them from the window (they are zero)."""
        for layer in self.layers:
            layer.k_buf[:self.rows, :, self.start:self.start + columns].zero_()
            layer.v_buf[:self.rows, :, self.start:self.start + columns].zero_()
        self.start += columns
        self._view()

    def _relayout(self, rows: int, left: int, room: int) -> None:
        """Move the window into new buffers with slots for `rows` rows, `left` zero columns added on its left,
        and at least `room` free columns on its right."""
        slots = min(self.max_rows, max(rows, 2 * self.capacity[0], MIN_SLOTS))
        columns = left + self.width + max(room, GROW_COLUMNS, left + self.width)
        columns = -(-columns // GROW_COLUMNS) * GROW_COLUMNS  # few distinct sizes: a compiled step makes a graph per size
        for layer, source in zip(self.layers, self._shapes(), strict=True):
            heads, dim, dtype, device = source
            k = torch.zeros(slots, heads, columns, dim, dtype=dtype, device=device)
            v = torch.zeros_like(k)
            if layer.k_buf is not None and self.rows:
                k[:self.rows, :, left:left + self.width] = layer.k_buf[:self.rows, :, self.start:self.end]
                v[:self.rows, :, left:left + self.width] = layer.v_buf[:self.rows, :, self.start:self.end]
            layer.k_buf, layer.v_buf = k, v
        self.start, self.end = 0, left + self.width
        self.relayouts += 1
        self._view()

    def _shapes(self):
        if self.layers[0].k_buf is not None:
            return [(layer.k_buf.shape[1], layer.k_buf.shape[3], layer.k_buf.dtype, layer.k_buf.device)
                    for layer in self.layers]
        return self._fresh_shapes

    def _view(self) -> None:
        for layer in self.layers:
            layer.view()
