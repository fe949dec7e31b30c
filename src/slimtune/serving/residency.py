"""Which tunings the engine's bank holds, as vLLM's LRU adapter manager decides it for LoRA.

- *pinned*: added directly (`Engine.add`): never evicted, and not reloadable from a store;
- *loaded*: loaded from the store on demand, least recently used first; when the bank holds `capacity`
  of them, the least recently used one that no running row uses (and the current batch does not need)
  is evicted to make room;
- *stale*: deleted or replaced in the store while rows still used it: those rows keep the old version,
  and it is evicted as soon as none does (a later request then loads what the store holds).

The store may be shared with other processes (server replicas), which replace and delete its tunings
without telling this one: each loaded tuning remembers the store's version it was read from, and every
request for it compares that with the version the store names now (`Store.version`, one readlink). The
bound: a request admitted to the batch after another process's replace or delete returned gets the new
version, or fails as a tuning that is no longer there; rows admitted before keep the version they started
with. A request whose tuning is deleted between its check and its load fails alone (`UnknownUserError`
naming the tuning), never the batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .. import storage
from ..errors import UnknownUserError
from ..methods import method_from_dict


class Residency:
    def __init__(self, bank: Any, store: Any, capacity: int, stats: Any, in_use: Callable[[str], bool],
                 on_evict: Callable[[str], None]):
        self.bank, self.store, self.capacity, self.stats = bank, store, capacity, stats
        self.in_use, self.on_evict = in_use, on_evict
        self.pinned: set[str] = set()
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.stale: set[str] = set()
        self.versions: dict[str, str] = {}  # the store's version each loaded tuning was read from

    @property
    def names(self) -> list[str]:
        return [*self.pinned, *(u for u in self.loaded if u not in self.pinned)]

    def pin(self, name: str) -> None:
        self.pinned.add(name)

    def current(self, name: str) -> bool:
        """Whether the bank's copy of `name` is what a new request for it gets: pinned, or loaded from the
        version the store names now."""
        if name in self.pinned:
            return True
        return name in self.loaded and name not in self.stale and self.versions.get(name) == self.store.version(name)

    def forget(self, name: str) -> None:
        """`name` is gone from the store (or was removed): evict it now, or once its rows are done."""
        if name in self.pinned:
            self.pinned.discard(name)
            self.loaded[name] = None  # evicted like a stored one once its rows are done
        if name in self.loaded:
            if self.in_use(name):
                self.stale.add(name)
            else:
                self.evict(name)

    def ensure(self, user: str | None, keep: set[str]) -> bool:
        """Load `user` if needed (evicting to make room, never one in `keep` or in use); False when it cannot
        be loaded yet (the bank is full of tunings in use, or its old version is still in use)."""
        if user is None or user in self.pinned:
            return True
        if user in self.loaded and not self.current(user):
            self.forget(user)  # replaced or deleted in the store, by this process or another
        if user in self.stale and not self.in_use(user):
            self.evict(user)
        if user in self.loaded and user not in self.stale:
            self.loaded.move_to_end(user)
            return True
        if user in self.stale:
            return False
        if len(self.loaded) >= self.capacity:
            victim = next((u for u in self.loaded if u not in keep and not self.in_use(u)), None)
            if victim is None:
                return False
            self.evict(victim)
        self.load(user)
        return True

    def load(self, user: str) -> None:
        """Read `user`'s current version from the store into the bank."""
        with torch.inference_mode(False):  # ordinary tensors: usable outside inference too
            try:
                stored = self.store.read(user)
            except UnknownUserError:  # deleted since the request was checked; the store's message names its folder
                raise UnknownUserError(f"unknown tuning {user!r}: it is no longer in the store") from None
            storage.check_model(stored.record.get("model", {}), self.bank.fingerprint, user)
            self.bank.add(user, (method_from_dict(stored.record.get("method", {})), stored.tensors))
        self.loaded[user] = None
        self.versions[user] = stored.version
        self.stats.loads += 1

    def evict(self, user: str) -> None:
        self.bank.remove(user)
        self.loaded.pop(user, None)
        self.stale.discard(user)
        self.versions.pop(user, None)
        self.on_evict(user)
        self.stats.evictions += 1
