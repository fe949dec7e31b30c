"""Which rows of the current batch belong to which user's tuning.

A `Routing` is set around every call through a `Bank`, per thread (each call through a bank is
synchronous, so asyncio tasks never interleave inside one; threads serving different batches
never see each other's routing). The hooks and the attention function that the methods install
read it; without an active routing they do nothing, so the shared model called directly is
always the frozen base model. A thread-local rather than a `ContextVar`: `torch.compile` traces
reads of a thread-local and cannot trace `ContextVar.get`, and a compiled decoding step must not
break its graph at every hook.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

_LOCAL = threading.local()  # .routing: the active Routing of this thread, if any

# One group: a user and the batch rows that are theirs (None: every row of the batch).
Group = tuple[str, torch.Tensor | None]


class Routing:
    """The users of one batch, row by row, and a per-call cache for the methods."""

    def __init__(
        self,
        users: Sequence[str | None],
        owners: dict[str, tuple[nn.Module, ...]],
        device: torch.device,
        capture: dict | None = None,
        keep_layout: bool = False,
    ):
        self.users = list(users)
        self.keep_layout = keep_layout  # the tunings change only by add and remove: see `SlotRows.params`
        self.device = device
        self.cache: dict = {}
        self.components = list(dict.fromkeys(c for cs in owners.values() for c in cs))
        self.capture = capture  # when a dict: attention keys/values are recorded into it, by module
        self._owners = owners  # user -> the components that hold their tuning
        self._groups: dict[tuple[int, int], list[Group]] = {}

    def groups(self, component: nn.Module, batch: int | None = None) -> list[Group]:
        """The (user, rows) groups of this batch whose tunings live in `component`.

        `batch` may be a multiple of the number of users: `generate()` repeats each row for
        beams or `num_return_sequences` (row i becomes rows i*f .. i*f+f-1).
        """
        n = len(self.users)
        batch = n if batch is None else batch
        key = (id(component), batch)
        if key not in self._groups:
            if batch % n:
                raise RuntimeError(f"a batch of {batch} rows cannot be routed for {n} users")
            factor = batch // n
            rows: dict[str, list[int]] = {}
            for i, user in enumerate(self.users):
                if user is not None and component in self._owners.get(user, ()):
                    rows.setdefault(user, []).extend(range(i * factor, i * factor + factor))
            groups: list[Group] = []
            for user, idx in rows.items():
                everyone = len(idx) == batch
                groups.append((user, None if everyone else torch.tensor(idx, device=self.device)))
            self._groups[key] = groups
        return self._groups[key]

    def stacked(self, component: nn.Module, batch: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """The component's rows as one gather: (users, rows, which) where row rows[i] belongs to
        users[which[i]]. Lets a method run every user's rows in one batched matmul."""
        key = ("stacked", id(component), batch)
        if key not in self.cache:
            groups = self.groups(component, batch)
            everyone = torch.arange(batch, device=self.device)
            rows = [everyone if r is None else r for _, r in groups]
            which = [torch.full((len(r),), i, device=self.device) for i, r in enumerate(rows)]
            self.cache[key] = ([u for u, _ in groups], torch.cat(rows), torch.cat(which))
        return self.cache[key]

    def in_order(self, component: nn.Module, batch: int) -> bool:
        """Whether `stacked()`'s rows are simply 0 .. batch-1 (every row the component's, users in row order)."""
        key = ("in-order", id(component), batch)
        if key not in self.cache:
            _, rows, _ = self.stacked(component, batch)
            self.cache[key] = len(rows) == batch and bool((rows == torch.arange(batch, device=rows.device)).all())
        return self.cache[key]

    def owners_key(self, component: nn.Module, batch: int) -> tuple:
        """A hashable form of which user owns each of the component's rows (for caches across calls)."""
        key = ("owners-key", id(component), batch)
        if key not in self.cache:
            users, rows, which = self.stacked(component, batch)
            self.cache[key] = (batch, tuple(rows.tolist()), tuple(which.tolist()))
        return self.cache[key]

    def per_row(self, component: nn.Module, batch: int, value: Callable[[str], int]) -> torch.Tensor:
        """A [batch] long tensor holding value(user) on each of the component's rows, 0 elsewhere."""
        out = torch.zeros(batch, dtype=torch.long, device=self.device)
        for user, rows in self.groups(component, batch):
            if rows is None:
                out.fill_(value(user))
            else:
                out[rows] = value(user)
        return out


def active() -> Routing | None:
    return getattr(_LOCAL, "routing", None)


@contextlib.contextmanager
def routed(routing: Routing | None) -> Iterator[Routing | None]:
    outer = active()
    _LOCAL.routing = routing
    try:
        yield routing
    finally:
        _LOCAL.routing = outer


def route(
    source: torch.Tensor,
    out: torch.Tensor,
    groups: list[Group],
    fn: Callable[[str, torch.Tensor], torch.Tensor],
    replace: bool = False,
) -> torch.Tensor:
    """Combine `fn(user, source[rows])` into `out` on each group's rows (added, or replacing them).

    Out-of-place, so each user's parameters receive gradient only from their own rows.
    """
    for user, rows in groups:
        if rows is None:
            value = fn(user, source)
            out = value.to(out.dtype) if replace else out + value.to(out.dtype)
        else:
            value = fn(user, source.index_select(0, rows)).to(out.dtype)
            out = out.index_copy(0, rows, value) if replace else out.index_add(0, rows, value)
    return out


def keep_routing_in_checkpoints(model: nn.Module) -> None:
    """Make gradient-checkpointed layers see the routing again when backward recomputes them.

    transformers checkpoints each layer's `forward` through `_gradient_checkpointing_func`; the
    recomputation runs during `backward()`, after the routing context has been left. Wrapping
    that function captures the routing at forward time and restores it for the recomputation.
    """
    for module in model.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is not None and not getattr(fn, "_keeps_routing", False):
            module._gradient_checkpointing_func = _with_routing(fn)


def _with_routing(checkpoint_fn: Callable) -> Callable:
    @functools.wraps(checkpoint_fn)
    def checkpointed(function: Callable, *args, **kwargs):
        routing = active()

        def run(*a, **k):  # in backward, possibly on autograd's own thread
            with routed(routing):
                return function(*a, **k)

        return checkpoint_fn(run, *args, **kwargs)

    checkpointed._keeps_routing = True
    return checkpointed
