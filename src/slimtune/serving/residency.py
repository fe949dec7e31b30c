"""Which tunings the engine's bank holds, as vLLM's LRU adapter manager decides it for LoRA.

- *pinned*: added directly (`Engine.add`): never evicted, and not reloadable from a store;
- *loaded*: loaded from the store on demand, least recently used first; when the bank holds `capacity`
  of them, the least recently used one that no running row uses (and the current batch does not need)
  is evicted to make room;
- *loading*: being read from the store in the background (S-LoRA's asynchronous adapter loading): the engine's
  batch steps on meanwhile, and the requests for it join the batch once it is in. Each holds its slot: a load
  is started only when `loaded` and `loading` together are fewer than `capacity`, the victim evicted then;
- *stale*: deleted or replaced in the store while rows still used it: those rows keep the old version,
  and it is evicted as soon as none does (a later request then loads what the store holds).

A load reads the tuning whole from the store, checks that it was made for this model, decodes its method and
builds its modules (`Bank.build`: every shape checked), all on a thread of its own (one: the disk reads one
tuning at a time anyway); only putting it into the bank (`Bank.add` of what was built: its slot in each table,
its hooks) runs on the engine's worker, between two steps.

The store may be shared with other processes (server replicas), which replace and delete its tunings
without telling this one: each loaded tuning remembers the store's version it was read from, and every
request for it compares that with the version the store names now (`Store.version`, one readlink); so does a
load that ends, before its tuning goes into the bank, and one that was replaced while it was read is read
again. The bound: a request admitted to the batch after another process's replace or delete returned gets
the new version, or fails as a tuning that is no longer there; rows admitted before keep the version they
started with. A request whose tuning is deleted between its check and its load, or whose load fails, fails
alone (`UnknownUserError` naming the tuning, or the store's error), never the batch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from .. import storage
from ..errors import UnknownUserError
from ..methods import method_from_dict


class _Read(NamedTuple):
    """A tuning read from the store, checked and decoded, ready to go into the bank."""

    version: str
    built: Any  # `Bank.build`'s


class Residency:
    def __init__(self, bank: Any, store: Any, capacity: int, stats: Any, in_use: Callable[[str], bool],
                 on_evict: Callable[[str], None], on_loaded: Callable[[], None] = lambda: None, guard: Any = None):
        """`on_loaded` is called (on the loading thread) whenever a load ends, well or not: the worker may be
        waiting for it. `guard`: the lock under which the bank serves (a load takes it only to make a method's
        component, for the first tuning of its kind)."""
        self.guard = guard
        self.bank, self.store, self.capacity, self.stats = bank, store, capacity, stats
        self.in_use, self.on_evict, self.on_loaded = in_use, on_evict, on_loaded
        self.pinned: set[str] = set()
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.loading: dict[str, Future] = {}  # each holds a slot; a load forgotten meanwhile is dropped when it ends
        self.stale: set[str] = set()
        self.versions: dict[str, str] = {}  # the store's version each loaded tuning was read from
        self._loader: ThreadPoolExecutor | None = None  # made at the first load

    @property
    def names(self) -> list[str]:
        return [*self.pinned, *(u for u in self.loaded if u not in self.pinned)]

    def pin(self, name: str) -> None:
        self._drop_load(name)  # what is added directly is what its requests get
        self.pinned.add(name)

    def current(self, name: str) -> bool:
        """Whether the bank's copy of `name` is what a new request for it gets: pinned, or loaded from the
        version the store names now."""
        if name in self.pinned:
            return True
        return name in self.loaded and name not in self.stale and self.versions.get(name) == self.store.version(name)

    def forget(self, name: str) -> None:
        """`name` is gone from the store (or was removed): evict it now, or once its rows are done; a load of it
        under way is dropped (the next request reads what the store holds then)."""
        self._drop_load(name)
        if name in self.pinned:
            self.pinned.discard(name)
            self.loaded[name] = None  # evicted like a stored one once its rows are done
        if name in self.loaded:
            if self.in_use(name):
                self.stale.add(name)
            else:
                self.evict(name)

    def ensure(self, user: str | None, keep: set[str]) -> bool:
        """Whether `user`'s tuning is in the bank, as the store holds it now; if not, start loading it in the
        background (evicting to make room, never one in `keep` or in use). False: not yet (its load is under way,
        or the bank is full of tunings in use, or its old version is still in use). Raises what made its load
        fail (deleted meanwhile, unreadable, made for another model), once, to the request that asks next."""
        if user is None or user in self.pinned:
            return True
        if user in self.loading:
            return self._finish(user)
        if user in self.loaded and not self.current(user):
            self.forget(user)  # replaced or deleted in the store, by this process or another
        if user in self.stale and not self.in_use(user):
            self.evict(user)
        if user in self.loaded and user not in self.stale:
            self.loaded.move_to_end(user)
            return True
        if user in self.stale:
            return False
        if len(self.loaded) + len(self.loading) >= self.capacity:
            victim = next((u for u in self.loaded if u not in keep and not self.in_use(u)), None)
            if victim is None:
                return False
            self.evict(victim)  # now, not when the load ends: the bank never holds more than `capacity`
        self._start(user)
        return False

    def _start(self, user: str) -> None:
        if self._loader is None:
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="slimtune-loads")
        future = self._loader.submit(self._read, user)
        self.loading[user] = future
        self.stats.loading = len(self.loading)
        future.add_done_callback(lambda _: self.on_loaded())

    def _read(self, user: str) -> _Read:
        """On the loading thread: `user`'s current version read from the store, checked to fit this model, and its
        method decoded; nothing shared is touched."""
        began = time.perf_counter()
        try:
            if self.store is None:
                raise UnknownUserError(f"unknown tuning {user!r}: it was removed")
            try:
                stored = self.store.read(user)
            except UnknownUserError:  # deleted since the request was checked; the store's message names its folder
                raise UnknownUserError(f"unknown tuning {user!r}: it is no longer in the store") from None
            storage.check_model(stored.record.get("model", {}), self.bank.fingerprint, user)
            method = method_from_dict(stored.record.get("method", {}))
            with torch.inference_mode(False):  # ordinary tensors: usable outside inference too
                return _Read(stored.version, self.bank.build((method, stored.tensors), guard=self.guard))
        finally:
            self.stats.load_seconds += time.perf_counter() - began  # written by this thread only

    def _finish(self, user: str) -> bool:
        """On the worker: put `user`'s tuning into the bank if its load has ended, and is still the store's."""
        future = self.loading[user]
        if not future.done():
            return False
        self._drop_load(user)
        read = future.result()  # a load that failed raises here, for this request
        if read.version != self.store.version(user):  # replaced or deleted while it was read: read it again
            self._start(user)
            return False
        began = time.perf_counter()
        with torch.inference_mode(False):
            self.bank.add(user, read.built)
        self.stats.load_stall_seconds += time.perf_counter() - began
        self.loaded[user] = None
        self.versions[user] = read.version
        self.stats.loads += 1
        return True

    def _drop_load(self, user: str) -> None:
        if self.loading.pop(user, None) is not None:
            self.stats.loading = len(self.loading)

    def evict(self, user: str) -> None:
        self.bank.remove(user)
        self.loaded.pop(user, None)
        self.stale.discard(user)
        self.versions.pop(user, None)
        self.on_evict(user)
        self.stats.evictions += 1

    def close(self) -> None:
        """Stop the loading thread: a read under way ends first, the queued ones are dropped."""
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)
        self.loading.clear()
        self.stats.loading = 0
