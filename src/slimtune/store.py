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
processes) serialise on an exclusive lock on `.lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from . import modules, storage
from .errors import ModelMismatchError, TuningError, TuningFileError, UnknownUserError
from .methods import method_from_dict

FORMAT = "slimtune-store"
VERSION = 1
ENTRY = "entry.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TuningError(
            f"invalid tuning name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class Store:
    """Named tunings for one base model. `model` (optional) fixes which base model the store is
    for when it is created, and is checked against it when it is opened."""

    def __init__(self, path: str | os.PathLike, model: nn.Module | None = None):
        self.path = Path(path)
        self.model = model
        self.tunings = self.path / "tunings"
        self.versions = self.path / "versions"
        current = modules.fingerprint(model) if model is not None else None
        self.fingerprint = self._open(current)

    # --- the store's own record ----------------------------------------------------------------

    def _open(self, current: dict | None) -> dict | None:
        record_file = self.path / "store.json"
        with self._locked():
            if record_file.is_file():
                try:
                    record = json.loads(record_file.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise TuningFileError(f"'{record_file}' is not valid JSON ({err})") from err
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
            self.tunings.mkdir(parents=True, exist_ok=True)
            self.versions.mkdir(parents=True, exist_ok=True)
            self._write_record(current)
            return current

    def _write_record(self, fingerprint: dict | None) -> None:
        record = {"format": FORMAT, "version": VERSION, "model": fingerprint}
        storage.atomic_write_json(self.path / "store.json", record)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
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
        return (self.tunings / name).resolve()

    def entry(self, name: str) -> StoreEntry:
        for attempt in range(3):  # a version replaced between resolving the link and reading it: look again
            folder = self.path_of(name)
            try:
                info = json.loads((folder / ENTRY).read_text())
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise UnknownUserError(f"the tuning {name!r} kept changing while it was read; try again") from None
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
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

    def add(self, name: str, tuning: Any, task: dict | None = None, replace: bool = False) -> StoreEntry:
        """Store `tuning` (a saved tuning folder, slimtune's or HF PEFT's, or a `TunedModel`) as `name`.

        The tuning is validated first (readable, checksum, method config, made for this store's
        base model); if anything is wrong the store is left unchanged. An existing `name` is
        refused unless `replace=True`. `task` (e.g. {"labels": [...], "label_words": {...},
        "template": "..."}) overrides the task recorded in the tuning, if any.
        """
        check_name(name)
        record, tensors = self._read(tuning)
        task = task if task is not None else record.get("task")
        self.versions.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.versions, prefix=".staging-"))
        try:
            record = {k: v for k, v in record.items() if k not in ("format", "version", "sha256")}
            if task is not None:
                record["task"] = task
            storage.write(staging, record, tensors)
            stored, _ = storage.read(staging)  # what is on disk reads back, checksum and all
            info = {"name": name, "method": stored["method"], "model": stored["model"], "task": task,
                    "bytes": (staging / storage.TENSORS).stat().st_size, "created": time.time()}
            storage.atomic_write_json(staging / ENTRY, info)
            with self._locked():
                self._check_fingerprint(stored["model"], name)
                link = self.tunings / name
                old = link.resolve() if name in self else None
                if old is not None and not replace:
                    raise TuningError(f"the store already holds a tuning named {name!r}; delete it or pass replace=True")
                version = self.versions / f"{name}.{uuid.uuid4().hex[:12]}"
                os.rename(staging, version)
                self.tunings.mkdir(parents=True, exist_ok=True)
                fresh = self.tunings / f".{name}.{uuid.uuid4().hex}.link"
                os.symlink(os.path.relpath(version, self.tunings), fresh)
                os.replace(fresh, link)  # the one step that changes what readers see
                if old is not None:
                    self._discard(old)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
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
        """Move out of sight in one rename, then remove: readers never see half a folder."""
        trash = self.path / f".trash-{uuid.uuid4().hex}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _check_fingerprint(self, model: dict, name: str) -> None:
        if self.fingerprint is None:  # the first tuning fixes the store's base model
            self.fingerprint = model
            self._write_record(model)
            return
        try:
            storage.check_model(model, self.fingerprint, name)
        except ModelMismatchError as err:
            raise ModelMismatchError(f"{err}; this store at '{self.path}' holds tunings of that base model only") from err

    def _read(self, tuning: Any) -> tuple[dict, dict]:
        from .bank import TunedModel, read_tuning

        if isinstance(tuning, TunedModel):
            return tuning.saved_form()
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
