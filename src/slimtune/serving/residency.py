"""Which tunings the engine's bank holds, as vLLM's LRU adapter manager decides it for LoRA.

- *pinned*: added directly (`Engine.add`): never evicted, and not reloadable from a store;
- *loaded*: loaded from the store on demand, least recently used first; when the bank holds `capacity`
  of them, the least recently used one that no running row uses (and the current batch does not need)
  is evicted to make room;
- *stale*: deleted or replaced in the store while rows still used it: those rows keep the old version,
  and it is evicted as soon as none does (a later request then loads what the store holds).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch


class Residency:
    def __init__(self, bank: Any, store: Any, capacity: int, stats: Any, in_use: Callable[[str], bool],
                 on_evict: Callable[[str], None]):
        self.bank, self.store, self.capacity, self.stats = bank, store, capacity, stats
        self.in_use, self.on_evict = in_use, on_evict
        self.pinned: set[str] = set()
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.stale: set[str] = set()

    @property
    def names(self) -> list[str]:
        return [*self.pinned, *(u for u in self.loaded if u not in self.pinned)]

    def pin(self, name: str) -> None:
        self.pinned.add(name)

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
        with torch.inference_mode(False):  # ordinary tensors: usable outside inference too
            self.bank.add(user, self.store.path_of(user))
        self.loaded[user] = None
        self.stats.loads += 1
        return True

    def evict(self, user: str) -> None:
        self.bank.remove(user)
        self.loaded.pop(user, None)
        self.stale.discard(user)
        self.on_evict(user)
        self.stats.evictions += 1
