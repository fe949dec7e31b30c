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
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
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
    """The admin key and the user keys (hashed, in a JSON file); safe to use from several threads."""

    def __init__(self, path: str | os.PathLike, admin_key: str):
        self.path = Path(path)
        self._admin = digest(admin_key)
        self._lock = threading.Lock()
        self._keys: dict[str, dict] = self._load()  # id -> {"sha256", "name", "created"}
        self._by_digest = {entry["sha256"]: key_id for key_id, entry in self._keys.items()}

    def _load(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        mode = self.path.stat().st_mode & 0o777
        if mode != PRIVATE:  # written by a release that left it readable to every local user
            try:
                self.path.chmod(PRIVATE)
            except OSError as err:
                raise KeyConfigError(f"the keys file '{self.path}' has mode {mode:#o} and cannot be made private "
                                     f"({PRIVATE:#o}): {err}; expected a file of the user running the server") from err
        try:
            record = storage.load_json(self.path.read_bytes(), "it")
        except (OSError, TuningFileError) as err:
            raise KeyConfigError(f"the keys file '{self.path}' is unreadable: {err}") from err
        if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("keys"), dict):
            raise KeyConfigError(f"'{self.path}' is not a slimtune keys file (expected format {FORMAT!r} with a 'keys' object)")
        return record["keys"]

    def _save(self) -> None:
        record = {"format": FORMAT, "version": VERSION, "keys": self._keys}
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
        key_id = self._by_digest.get(hashed)
        return Caller(key_id) if key_id is not None else None

    def create(self, name: str = "") -> tuple[str, KeyInfo]:
        """A new user key: (the key, shown once and never stored; its public info)."""
        key = "st-" + secrets.token_urlsafe(32)
        with self._lock:
            key_id = secrets.token_hex(6)
            while key_id in self._keys:
                key_id = secrets.token_hex(6)
            self._keys[key_id] = {"sha256": digest(key), "name": name, "created": int(time.time())}
            try:
                self._save()
            except BaseException:
                del self._keys[key_id]
                raise
            self._by_digest[digest(key)] = key_id
        return key, self.info(key_id)

    def delete(self, key_id: str) -> bool:
        """Revoke a key at once; False if there is no such key."""
        with self._lock:
            entry = self._keys.pop(key_id, None)
            if entry is None:
                return False
            try:
                self._save()
            except BaseException:
                self._keys[key_id] = entry
                raise
            self._by_digest.pop(entry["sha256"], None)
        return True

    def info(self, key_id: str) -> KeyInfo:
        entry = self._keys[key_id]
        return KeyInfo(id=key_id, name=entry.get("name", ""), created=entry.get("created", 0))

    def list(self) -> list[KeyInfo]:
        with self._lock:
            return [self.info(key_id) for key_id in sorted(self._keys)]

    def __contains__(self, key_id: str) -> bool:
        return key_id in self._keys
