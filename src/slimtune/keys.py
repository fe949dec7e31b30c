"""API keys for `slimtune serve`: who may call the server, and whose tunings are whose.

Every request carries `Authorization: Bearer <key>`. There are two kinds of key:

- the **admin key**, given to the server when it starts (environment variable or file, never a
  default): it creates and deletes the other keys;
- **user keys**, made by the admin (`KeyRing.create`): each has a short public id, which owns the
  tunings uploaded with it (stored as ``<id>.<name>``, so two keys can use the same name).

Only a key's SHA-256 is kept, in ``keys.json`` next to the store's tunings, rewritten atomically
on every change. The keys are 256 random bits, so a fast unsalted hash is enough: nobody can
guess one from its hash, and looking a key up by its hash takes no comparison that leaks timing.
The file is still private (0600, and tightened to that when a `KeyRing` opens it): its key ids and
names say who uses the server, and a key id is the prefix of its owner's tunings' names.

Several servers may share the file (replicas over one store: the README's "One store, several servers"): changes are
made under an flock of ``.keys.json.lock``, to the file as it is then, so none is lost, and every
process reads the file again at its next request once it changed: a key made or revoked by one server
is accepted or refused by all at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import storage
from .errors import TuningError, TuningFileError

FORMAT = "slimtune-keys"
VERSION = 1
ADMIN = "admin"  # the admin's owner id; user key ids are hex, so never this
ADMIN_ENV = "SLIMTUNE_ADMIN_KEY"
MIN_ADMIN_KEY = 16  # characters: a short admin key could be guessed
PRIVATE = 0o600  # the keys file's mode: its owner's only


class KeyConfigError(TuningError):
    """The keys file is unreadable, or the admin key is missing or too weak."""


@dataclass(frozen=True)
class Caller:
    """Who sent a request: `id` owns tunings (``<id>.<name>`` in the store)."""

    id: str
    admin: bool = False


@dataclass(frozen=True)
class KeyInfo:
    """What is public about a user key (never the key itself)."""

    id: str
    name: str
    created: int


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_admin_key(path: str | os.PathLike | None = None) -> str:
    """The admin key from `path` (first line) or else from $SLIMTUNE_ADMIN_KEY; refuses to go without one."""
    if path is not None:
        try:
            key = Path(path).read_text().strip()
        except OSError as err:
            raise KeyConfigError(f"cannot read the admin key file '{path}': {err}") from err
        where = f"the admin key file '{path}'"
    else:
        key = os.environ.get(ADMIN_ENV, "").strip()
        where = f"${ADMIN_ENV}"
    if not key:
        raise KeyConfigError(f"slimtune serve needs an admin key and has none: set {ADMIN_ENV} or pass --admin-key-file "
                        f"(there is no default key); {where} is empty or unset")
    if len(key) < MIN_ADMIN_KEY or any(c.isspace() for c in key):
        raise KeyConfigError(f"the admin key from {where} is too weak: expected at least {MIN_ADMIN_KEY} characters and "
                        "no spaces (e.g. the output of: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return key


class KeyRing:
    """The admin key and the user keys (hashed, in a JSON file); safe to use from several threads and processes.

    Several servers may share one keys file (replicas over one store): each request re-reads the file if it
    changed since this process last read it (one open and fstat, the file's identity compared), so a key made
    or revoked by any process is accepted or refused by every process at its next request. Changes are made
    under an exclusive flock of a lock file beside the keys file, on the file as it is then, so two processes
    making keys at once lose neither.
    """

    def __init__(self, path: str | os.PathLike, admin_key: str):
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._admin = digest(admin_key)
        self._lock = threading.Lock()  # one thread at a time: also what an flock emulated by POSIX locks needs
        self._keys: dict[str, dict] = {}  # id -> {"sha256", "name", "created"}
        self._by_digest: dict[str, str] = {}
        self._seen: tuple | None = None  # the identity of the file `_keys` was read from; None: no file
        with self._lock:
            self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        """Read the keys file again if it is not the one last read (it is only ever replaced, by a rename, so a
        new inode, size or time means new contents). Under `self._lock`."""
        try:
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())
                seen = _identity(stat)
                if seen == self._seen and not force:
                    return
                keys = self._load(f, stat.st_mode & 0o777)
        except FileNotFoundError:
            seen, keys = None, {}
        except OSError as err:
            raise KeyConfigError(f"the keys file '{self.path}' is unreadable: {err}") from err
        self._keys, self._seen = keys, seen
        self._by_digest = {entry["sha256"]: key_id for key_id, entry in keys.items()}

    def _load(self, file, mode: int) -> dict[str, dict]:
        if mode != PRIVATE:  # written by a release that left it readable to every local user
            try:
                self.path.chmod(PRIVATE)
            except OSError as err:
                raise KeyConfigError(f"the keys file '{self.path}' has mode {mode:#o} and cannot be made private "
                                     f"({PRIVATE:#o}): {err}; expected a file of the user running the server") from err
        try:
            record = storage.load_json(file.read(), "it")
        except (OSError, TuningFileError) as err:
            raise KeyConfigError(f"the keys file '{self.path}' is unreadable: {err}") from err
        if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("keys"), dict):
            raise KeyConfigError(f"'{self.path}' is not a slimtune keys file (expected format {FORMAT!r} with a 'keys' object)")
        return record["keys"]

    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, dict]]:
        """The keys as the file holds them now, to change in the block: written back when it ends, all or nothing,
        with every other writer (thread or process) kept out from the read to the write."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, PRIVATE)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._refresh()
                keys = dict(self._keys)
                yield keys
                if keys != self._keys:
                    self._save(keys)
                    # the file just written: nobody else writes while the flock is held
                    self._keys, self._seen = keys, _identity(os.stat(self.path))
                    self._by_digest = {entry["sha256"]: key_id for key_id, entry in keys.items()}
            finally:
                os.close(lock)  # and with it the flock

    def _save(self, keys: dict[str, dict]) -> None:
        record = {"format": FORMAT, "version": VERSION, "keys": keys}
        data = storage.json_bytes(record, sort_keys=True)
        if len(data) > storage.MAX_JSON_BYTES:  # a file the next start could not read back would lock everyone out
            raise KeyConfigError(f"the keys file would be {len(data)} bytes with this change, more than the "
                                 f"{storage.MAX_JSON_BYTES} it may have: delete unused keys first")
        storage.atomic_write(self.path, data, mode=PRIVATE)

    def caller(self, key: str) -> Caller | None:
        """Who holds `key`, or None for a key that is not (or no longer) valid."""
        hashed = digest(key)
        if hmac.compare_digest(hashed, self._admin):
            return Caller(ADMIN, admin=True)
        with self._lock:
            self._refresh()
            key_id = self._by_digest.get(hashed)
        return Caller(key_id) if key_id is not None else None

    def create(self, name: str = "") -> tuple[str, KeyInfo]:
        """A new user key: (the key, shown once and never stored; its public info)."""
        key = "st-" + secrets.token_urlsafe(32)
        with self._changing() as keys:
            key_id = secrets.token_hex(6)
            while key_id in keys:
                key_id = secrets.token_hex(6)
            keys[key_id] = {"sha256": digest(key), "name": name, "created": int(time.time())}
        return key, _info(key_id, keys[key_id])

    def delete(self, key_id: str) -> bool:
        """Revoke a key at once, for every process sharing the keys file; False if there is no such key."""
        with self._changing() as keys:
            if keys.pop(key_id, None) is None:
                return False
        return True

    def info(self, key_id: str) -> KeyInfo:
        return _info(key_id, self._keys[key_id])

    def list(self) -> list[KeyInfo]:
        with self._lock:
            self._refresh()
            return [_info(key_id, entry) for key_id, entry in sorted(self._keys.items())]

    def __contains__(self, key_id: str) -> bool:
        with self._lock:
            self._refresh()
            return key_id in self._keys


def _identity(stat: os.stat_result) -> tuple:
    """What tells one keys file from another: it is replaced (a new inode), never written in place."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _info(key_id: str, entry: dict) -> KeyInfo:
    return KeyInfo(id=key_id, name=entry.get("name", ""), created=entry.get("created", 0))
