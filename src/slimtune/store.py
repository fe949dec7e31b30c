"""A folder of named tunings (one per user or task) for one base model.

    store/
      store.json               which base model the store is for (its fingerprint)
      .lock                    held while the store changes, so concurrent writers take turns
      tunings/<name>           a link to the current version of the tuning:
      versions/<name>.<id>/    a saved tuning (slimtune.json + tuning.safetensors), plus
                               entry.json: name, method, size, creation time, task

Adding is atomic and validated: the tuning is read back from a private temporary folder (checksum,
method config, model fingerprint), moved to a version folder of its own, and made visible by
one atomic `rename` of the link, so a reader sees the old whole version or the new whole one,
never none in between, and a refused tuning leaves the store as it was. Writers (threads or
processes) serialise on an exclusive lock on `.lock`; `add(..., admit=...)` checks a quota under it.

Several processes may share one store (server replicas, on one machine or several over a shared file
system). A replaced or deleted version's folder is discarded at once, so `Store.read(name)` reads a
tuning under a shared lock on `.lock`: it gets the old whole version or the new whole one, never half of
one. `Store.version(name)` (one readlink) tells a process whether what it read is still current. The
bound: once another process's `add` or `delete` has returned, every later `read`, `version`, `names` or
`entry` in any process sees the new state.

What this asks of a shared file system: flock honoured across clients (Linux NFSv4 emulates flock with
POSIX locks, which also serve; CephFS; Lustre mounted with `-o flock`, not `localflock`), rename atomic
within a directory, and close-to-open consistency. On NFS a client may answer a name lookup from its
cache for up to its attribute-cache time (`acdirmax`, 60 s by default): the bound then holds after that
delay, or at once with the store mounted `lookupcache=none` (or `actimeo=0`). The README's "One store, several
servers" says the same for users.

Private: the store, `tunings/` and `versions/` are 0700 (tightened to that when a store is opened
with a model, as `slimtune serve` and `slimtune train` open it), and version and scratch folders are
made 0700, so no other local user can list whose tunings there are or read them.

Crash leftovers are removed by `Store.clean()`, which runs when a store is opened with a model (its
list is `Store.cleaned`). Under the exclusive lock, which every step that makes them holds: temporary
links `tunings/.*.link`, `.trash-*` folders, and version folders no `tunings/<name>` links to.
Scratch folders (`.staging-*` for `add`, `.upload-*` for the server's uploads; from `Store.scratch`)
are made without the lock, so each writer holds an flock on its folder's `.owner` file while the
folder lives: one is removed only when that lock is free (its writer has died), or, with no `.owner`
(an older release's, including its `versions/.staging-*`), once it is untouched for an hour. Another
process writing to the store meanwhile loses nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from . import modules, storage
from .errors import ModelMismatchError, TuningError, TuningFileError, UnknownUserError
from .methods import method_from_dict

FORMAT = "slimtune-store"
VERSION = 1
ENTRY = "entry.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_FOLDER = re.compile(NAME.pattern + r"\.[0-9a-f]{12}")  # versions/<name>.<id>
PRIVATE = 0o700  # the store's folders: their owner's only
SCRATCH = (".staging-", ".upload-")  # the prefixes of `Store.scratch` folders, which `clean` knows
OWNER = ".owner"  # in a scratch folder: flocked by its writer while the folder is in use
STALE = 3600.0  # seconds untouched after which a scratch folder with no OWNER (an older release's) is dead

# One thread of this process at a time holds an flock of a store's `.lock`: where flock is emulated by POSIX locks
# (NFS), those belong to the process, so two threads' locks would not exclude each other, and closing either
# file would drop both.
_IN_PROCESS: dict[str, threading.Lock] = {}
_IN_PROCESS_GUARD = threading.Lock()


@dataclass(frozen=True)
class StoreEntry:
    """One stored tuning, as `Store.list()` describes it."""

    name: str
    method: dict  # the method's config, with its "kind"
    bytes: int  # tensors on disk
    created: float  # seconds since the epoch
    model: dict  # fingerprint of the base model it was trained on
    task: dict | None  # the task it was trained for (labels, label words, template), if recorded
    path: Path

    @property
    def kind(self) -> str:
        return self.method.get("kind", "")


class StoredTuning(NamedTuple):
    """One version of a stored tuning, read whole (`Store.read`)."""

    version: str  # the id `Store.version` gives while it is current
    record: dict  # method, model fingerprint, task, checksum
    tensors: dict[str, torch.Tensor]


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TuningError(
            f"invalid tuning name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class Store:
    """Named tunings for one base model. `model` (optional) fixes which base model the store is
    for when it is created, and is checked against it when it is opened; opened with a model, the
    store is also made private and cleaned of crash leftovers (`cleaned` lists what was removed)."""

    def __init__(self, path: str | os.PathLike, model: nn.Module | None = None):
        self.path = Path(path)
        self.model = model
        self.tunings = self.path / "tunings"
        self.versions = self.path / "versions"
        with _IN_PROCESS_GUARD:
            self._in_process = _IN_PROCESS.setdefault(os.path.realpath(self.path), threading.Lock())
        current = modules.fingerprint(model) if model is not None else None
        self.fingerprint = self._open(current)
        self.cleaned: list[str] = []
        if model is not None:  # the owner's server or training run, not a reader in passing
            self._make_private()
            self.cleaned = self.clean()

    # --- the store's own record ----------------------------------------------------------------

    def _open(self, current: dict | None) -> dict | None:
        record_file = self.path / "store.json"
        with self._locked():
            if record_file.is_file():
                record = storage.load_json(record_file.read_bytes(), f"'{record_file}'")
                if not isinstance(record, dict) or record.get("format") != FORMAT:
                    raise TuningFileError(f"'{self.path}' is not a slimtune store (expected format {FORMAT!r} in store.json)")
                stored = record.get("model")
                if current is None:
                    return stored
                if stored is None:
                    self._write_record(current)
                else:
                    storage.check_model(stored, current, f"store {self.path}")
                return current  # this model's own: tunings added are checked against it
            self.tunings.mkdir(mode=PRIVATE, exist_ok=True)
            self.versions.mkdir(mode=PRIVATE, exist_ok=True)
            self._write_record(current)
            return current

    def _write_record(self, fingerprint: dict | None) -> None:
        record = {"format": FORMAT, "version": VERSION, "model": fingerprint}
        storage.atomic_write_json(self.path / "store.json", record)

    def _make_private(self) -> None:
        """Tighten a store made by a release that left its folders readable to every local user."""
        for folder in (self.path, self.tunings, self.versions):
            folder.mkdir(mode=PRIVATE, exist_ok=True)
            mode = folder.stat().st_mode & 0o777
            if mode != PRIVATE:
                try:
                    folder.chmod(PRIVATE)
                except OSError as err:
                    raise TuningError(f"the store folder '{folder}' has mode {mode:#o} and cannot be made private "
                                      f"({PRIVATE:#o}): {err}; expected a store of the user opening it") from err

    @contextlib.contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        """Hold `.lock`: exclusive for a change, `shared` for a read that no change may cut through. Not
        re-entrant: nothing called under it may lock again (a second flock would wait for the first)."""
        self.path.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
        with self._in_process, open(self.path / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # --- reading -------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return isinstance(name, str) and NAME.fullmatch(name) is not None and (self.tunings / name / ENTRY).is_file()

    def __len__(self) -> int:
        return len(self.names())

    def names(self) -> list[str]:
        if not self.tunings.is_dir():
            return []
        return sorted(p.name for p in self.tunings.iterdir() if NAME.fullmatch(p.name) and (p / ENTRY).is_file())

    def path_of(self, name: str) -> Path:
        """The folder of a stored tuning's current version (what `Bank.add` and `slimtune.load` read)."""
        if name not in self:
            raise UnknownUserError(f"no tuning named {name!r} in the store at '{self.path}'")
        try:
            return (self.tunings / name).resolve()
        except FileNotFoundError:  # deleted, by another process, between the check and the link's reading
            raise UnknownUserError(f"no tuning named {name!r} in the store at '{self.path}'") from None

    def version(self, name: str) -> str | None:
        """The id of the version `tunings/<name>` names now, or None if there is no such tuning: one readlink,
        to tell whether a copy read earlier (`read`) is still current or was replaced or deleted meanwhile,
        by this process or another."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            return None
        try:
            folder = os.path.basename(os.readlink(self.tunings / name))
        except OSError:  # no such link (or not a link)
            return None
        version = folder[len(name) + 1:]
        return version if folder == f"{name}.{version}" and VERSION_FOLDER.fullmatch(folder) else None

    def read(self, name: str) -> StoredTuning:
        """The current version of a stored tuning, read whole (checksum checked). Under a shared lock of the
        store: a process replacing or deleting the tuning meanwhile waits for it, so this reads the old version
        or the new one, never half of one; `UnknownUserError` if the store holds no tuning of that name."""
        with self._locked(shared=True):
            version = self.version(name)
            if version is None:
                raise UnknownUserError(f"no tuning named {name!r} in the store at '{self.path}'")
            record, tensors = storage.read(self.versions / f"{name}.{version}")
        return StoredTuning(version, record, tensors)

    def entry(self, name: str) -> StoreEntry:
        for attempt in range(3):  # a version replaced between resolving the link and reading it: look again
            folder = self.path_of(name)
            try:
                info = storage.load_json((folder / ENTRY).read_bytes(), f"'{folder / ENTRY}'")
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise UnknownUserError(f"the tuning {name!r} kept changing while it was read; try again") from None
            except (OSError, TuningFileError) as err:
                raise TuningFileError(f"the store's entry for {name!r} is unreadable: {err}") from err
        return StoreEntry(name=name, method=info["method"], bytes=info["bytes"], created=info["created"],
                          model=info["model"], task=info.get("task"), path=folder)

    def list(self) -> list[StoreEntry]:
        out = []
        for name in self.names():
            with contextlib.suppress(UnknownUserError):  # deleted meanwhile
                out.append(self.entry(name))
        return out

    # --- changing ------------------------------------------------------------------------------

    def add(self, name: str, tuning: Any, task: dict | None = None, replace: bool = False,
            admit: Callable[[], None] | None = None) -> StoreEntry:
        """Store `tuning` (a saved tuning folder, slimtune's or HF PEFT's, a `TunedModel`, or a saved form:
        (record, tensors)) as `name`.

        The tuning is validated first (readable, checksum, method config, made for this store's
        base model); if anything is wrong the store is left unchanged. An existing `name` is
        refused unless `replace=True`. `task` (e.g. {"labels": [...], "label_words": {...},
        "template": "..."}) overrides the task recorded in the tuning, if any.

        `admit`, if given, is called under the store's exclusive lock, just before the new version is made
        visible (a replaced version still listed): whatever it raises refuses the add and leaves the store as
        it was. No other writer, in any process, changes the store between its check and the add, so it can
        hold a quota across processes, reading only what it needs (e.g. `names()`, and `entry()` of one
        owner's tunings: every other process's loads wait while it runs). It must not call the store's
        `read`, `add`, `delete` or `clean`.
        """
        check_name(name)
        record, tensors = self._saved_form(tuning)
        if method_from_dict(record.get("method", {})).writes_base:
            raise TuningError(f"a {record['method']['kind']} tuning is a whole model, not a tuning of this store's frozen "
                              "base model; save it with save_pretrained instead")
        task = task if task is not None else record.get("task")
        with self.scratch(".staging-") as staging:
            record = {k: v for k, v in record.items() if k not in ("format", "version", "sha256")}
            if task is not None:
                record["task"] = task
            storage.write(staging, record, tensors)
            stored, _ = storage.read(staging)  # what is on disk reads back, checksum and all
            info = {"name": name, "method": stored["method"], "model": stored["model"], "task": task,
                    "bytes": (staging / storage.TENSORS).stat().st_size, "created": time.time()}
            storage.atomic_write_json(staging / ENTRY, info)
            with self._locked():
                link = self.tunings / name
                old = link.resolve() if name in self else None
                if old is not None and not replace:
                    raise TuningError(f"the store already holds a tuning named {name!r}; delete it or pass replace=True")
                if admit is not None:
                    admit()
                self._check_fingerprint(stored["model"], name)  # the first tuning's is written: only now
                version = self.versions / f"{name}.{uuid.uuid4().hex[:12]}"
                self.versions.mkdir(mode=PRIVATE, exist_ok=True)
                (staging / OWNER).unlink()  # a version, not scratch; clean() waits for the lock, so never sees it ownerless
                os.rename(staging, version)
                self.tunings.mkdir(mode=PRIVATE, exist_ok=True)
                fresh = self.tunings / f".{name}.{uuid.uuid4().hex}.link"
                os.symlink(os.path.relpath(version, self.tunings), fresh)
                os.replace(fresh, link)  # the one step that changes what readers see
                if old is not None:
                    self._discard(old)
        return StoreEntry(name=name, method=info["method"], bytes=info["bytes"], created=info["created"],
                          model=info["model"], task=task, path=version)

    def delete(self, name: str) -> None:
        check_name(name)
        with self._locked():
            if name not in self:
                raise UnknownUserError(f"no tuning named {name!r} in the store at '{self.path}'")
            version = (self.tunings / name).resolve()
            os.unlink(self.tunings / name)  # gone for readers in one step
            self._discard(version)

    def _discard(self, folder: Path) -> None:
        """Move out of sight in one rename, then remove: readers never see half a folder. Under the lock:
        a crash midway leaves a `.trash-*` folder that the next `clean()` knows nobody is using."""
        trash = self.path / f".trash-{uuid.uuid4().hex}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def scratch(self, prefix: str) -> Iterator[Path]:
        """A new private (0700) empty folder `<store>/<prefix><random>` for files on their way into the store,
        removed on leaving the block unless it was renamed away meanwhile. While the block runs, `clean()` in any
        process leaves it alone: this holds an flock on its `.owner` file, which a dead writer's folder has free.
        `prefix` is one of `SCRATCH` (".staging-", ".upload-"), the names `clean()` looks for."""
        if prefix not in SCRATCH:
            raise ValueError(f"unknown scratch folder prefix {prefix!r}: expected one of {SCRATCH}, which clean() knows")
        self.path.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=self.path, prefix=prefix))
        try:
            # Locked before it is named OWNER: clean() may not catch it created but not yet locked, and take it
            # for a dead writer's. Until the rename the folder has no OWNER, and is recent, so it is kept.
            fresh = folder / f"{OWNER}-new"
            owner = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        try:
            fcntl.flock(owner, fcntl.LOCK_EX)
            os.rename(fresh, folder / OWNER)
            yield folder
        finally:
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            os.close(owner)  # only now: while the files are removed the folder is still this writer's

    def clean(self) -> list[str]:
        """Remove what crashed writers left in the store (see the module's docstring), and say what: paths
        relative to the store. Safe while other processes write to it: they keep what they are working on."""
        removed: list[str] = []
        with self._locked():  # nothing made under the lock is half-made while we hold it
            for folder in (self.path, self.versions):  # versions/ held scratch folders in older releases
                for item in _folders(folder, SCRATCH):
                    if _abandoned(item):
                        try:
                            self._discard(item)
                        except FileNotFoundError:  # not abandoned: its writer was just done, and removed it
                            continue
                        removed.append(item.relative_to(self.path).as_posix())
            for item in _folders(self.path, (".trash-",)):
                shutil.rmtree(item, ignore_errors=True)
                removed.append(item.name)
            for item in sorted(self.path.glob(".*.tmp")):  # an atomic write (keys.json, the store's record) killed
                try:
                    if item.is_file() and not item.is_symlink() and time.time() - item.stat().st_mtime > STALE:
                        item.unlink()
                        removed.append(item.name)
                except FileNotFoundError:  # its writer was just done
                    continue
            linked = set()
            if self.tunings.is_dir():
                for link in sorted(self.tunings.iterdir()):
                    if link.is_symlink() and link.name.startswith(".") and link.name.endswith(".link"):
                        link.unlink()  # a new link that never replaced the old one
                        removed.append(link.relative_to(self.path).as_posix())
                    elif link.is_symlink() and NAME.fullmatch(link.name):
                        linked.add(os.path.realpath(link))
            if self.versions.is_dir():
                for version in sorted(self.versions.iterdir()):
                    if (VERSION_FOLDER.fullmatch(version.name) and not version.is_symlink() and version.is_dir()
                            and os.path.realpath(version) not in linked):  # renamed into place, never linked
                        self._discard(version)
                        removed.append(version.relative_to(self.path).as_posix())
        return removed

    def _check_fingerprint(self, model: dict, name: str) -> None:
        if self.fingerprint is None:  # the first tuning fixes the store's base model
            self.fingerprint = model
            self._write_record(model)
            return
        try:
            storage.check_model(model, self.fingerprint, name)
        except ModelMismatchError as err:
            raise ModelMismatchError(f"{err}; this store at '{self.path}' holds tunings of that base model only") from err

    def _saved_form(self, tuning: Any) -> tuple[dict, dict]:
        from .bank import TunedModel, read_tuning

        if isinstance(tuning, TunedModel):
            return tuning.saved_form()
        if isinstance(tuning, tuple) and len(tuning) == 2 and all(isinstance(part, dict) for part in tuning):
            record, tensors = tuning  # already read and checked, e.g. by `Engine.check`
            method_from_dict(record.get("method", {}))
            return record, tensors
        if not isinstance(tuning, (str, os.PathLike)):
            raise TuningError(f"cannot store a {type(tuning).__name__}: expected a saved tuning folder or a TunedModel")
        from . import peft_format

        if peft_format.is_peft_folder(tuning):
            if self.model is None:
                raise TuningError("adding an HF PEFT folder needs the base model: open the store with Store(path, model=...)")
            method, state = read_tuning(tuning, self.model, self.fingerprint)
            return {"method": method.to_dict(), "model": self.fingerprint}, state
        record, tensors = storage.read(tuning)
        method_from_dict(record.get("method", {}))  # an unknown method or bad config is refused here
        return record, tensors  # its base model is checked against the store's when it is added


def _folders(parent: Path, prefixes: tuple[str, ...]) -> list[Path]:
    """The folders (not links to folders) in `parent` whose names start with one of `prefixes`."""
    if not parent.is_dir():
        return []
    with os.scandir(parent) as items:
        return sorted(Path(item.path) for item in items
                      if item.name.startswith(prefixes) and item.is_dir(follow_symlinks=False))


def _abandoned(folder: Path) -> bool:
    """Whether no live writer holds the scratch `folder`: its OWNER's flock is free, or, with no OWNER (being
    made, or an older release's), it has been untouched for STALE seconds."""
    try:
        owner = os.open(folder / OWNER, os.O_RDONLY)
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > STALE
        except FileNotFoundError:  # its writer finished meanwhile
            return False
    except OSError:  # not ours to judge (unreadable): keep it
        return False
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(owner)
    return True
