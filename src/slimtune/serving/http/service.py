"""The service behind the HTTP routes, shared by the single-process app and the Ray Serve replicas.

A tuning belongs to the key that uploaded it and is stored as ``<key id>.<name>``: a key sees and uses
only its own tunings and the base model, and another key's tuning answers exactly as one that does not
exist. Rooms: `generation` (completions, chat, classification), `tunings` (models, uploads, deletes),
`KeyAdmin` here (the admin's keys), and `Service`, which holds what they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ...engine import Engine
from ...errors import UnknownUserError
from ...keys import ADMIN, Caller, KeyConfigError, KeyRing
from ...store import Store
from .generation import Generation
from .metrics import Metrics
from .schema import (
    MAX_BYTES_PER_KEY,
    MAX_REQUESTS_PER_KEY,
    MAX_TUNINGS_PER_KEY,
    TUNING_NAME,
    UPLOADS_AT_ONCE,
    APIError,
    KeyBody,
    parse,
    unknown_model,
)
from .tunings import Traffic, Tunings


class KeyAdmin:
    """The admin's calls: make, list and revoke user keys."""


    async def create_key(self, request: Request, caller: Caller) -> JSONResponse:
        self.admin_only(caller)
        body = await parse(request, KeyBody)
        if len(body.name) > 200:
            raise APIError(400, "A key's name is at most 200 characters.", param="name")
        try:
            key, info = await asyncio.to_thread(self.keys.create, body.name)
        except KeyConfigError as err:  # the keys file is at its size limit
            raise APIError(403, f"No key was made: {err}.", param="name", code="quota_exceeded") from err
        return JSONResponse({"object": "key", "id": info.id, "name": info.name, "created": info.created, "key": key}, 201)

    def list_keys(self, caller: Caller) -> dict:
        self.admin_only(caller)
        return {"object": "list", "data": [{"object": "key", "id": k.id, "name": k.name, "created": k.created}
                                           for k in self.keys.list()]}

    async def delete_key(self, caller: Caller, key_id: str) -> dict:
        """Revoke a key at once, then delete its tunings (nobody else could ever use them)."""
        self.admin_only(caller)
        if key_id == ADMIN or not await asyncio.to_thread(self.keys.delete, key_id):
            raise APIError(404, f"No key with id '{key_id[:64]}'.", param="id", code="key_not_found")
        prefix = f"{key_id}."
        gone = [name for name in self.store.names() if name.startswith(prefix)]
        for stored in gone:
            async with self.traffic.change(stored):
                await self.forget(stored)
        return {"object": "key", "id": key_id, "deleted": True, "tunings_deleted": len(gone)}


class Service(Generation, Tunings, KeyAdmin):
    """What the routes do (`app.create_app` wires it to HTTP): who is calling, the caller's names for the store's
    tunings, and holds on them; its rooms are `Generation`, `Tunings` and `KeyAdmin`."""

    def __init__(self, engine: Engine, store: Store, keys: KeyRing, base_name: str, *,
                 max_tunings: int = MAX_TUNINGS_PER_KEY, max_bytes: int = MAX_BYTES_PER_KEY,
                 max_requests: int = MAX_REQUESTS_PER_KEY):
        if not base_name:
            raise ValueError("base_name must name the base model (e.g. 'smollm2-135m')")
        self.engine, self.store, self.keys, self.base_name = engine, store, keys, base_name
        self.max_tunings, self.max_bytes, self.max_requests = max_tunings, max_bytes, max_requests
        self._in_flight: Counter[str] = Counter()  # requests of each key in the engine
        self.uploads = asyncio.Semaphore(UPLOADS_AT_ONCE)
        self._uploading: set[str] = set()  # keys with an upload in progress
        self.traffic = Traffic()
        self.metrics = Metrics(engine)
        self.started = int(time.time())
        self.closing = False
        self._tasks: set[asyncio.Task] = set()

    # who is calling

    def authenticate(self, request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise APIError(401, "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
                                "(Authorization: Bearer YOUR_KEY).")
        caller = self.keys.caller(key.strip()) if scheme.lower() == "bearer" else None
        if caller is None:
            raise APIError(401, "Incorrect API key provided: expected 'Authorization: Bearer <key>' with a key made by "
                                "the admin (POST /v1/keys).", code="invalid_api_key")
        return caller

    @staticmethod
    def admin_only(caller: Caller) -> None:
        if not caller.admin:
            raise APIError(403, "Managing keys needs the admin key.", code="admin_only")

    # names: the caller's view and the store's

    def stored_name(self, caller: Caller, name: Any) -> str | None:
        """The store's name of the caller's tuning `name`, or None if `name` cannot be a tuning name."""
        if not isinstance(name, str) or name == self.base_name or not TUNING_NAME.fullmatch(name):
            return None
        return f"{caller.id}.{name}"

    def own_entries(self, caller: Caller) -> list[tuple[str, Any]]:
        """(the caller's name, the store's entry) of each of the caller's tunings."""
        prefix, out = f"{caller.id}.", []
        for stored in self.store.names():
            if stored.startswith(prefix):
                with contextlib.suppress(UnknownUserError):  # deleted meanwhile
                    out.append((stored[len(prefix):], self.store.entry(stored)))
        return out

    async def hold(self, caller: Caller, model: str, count: int = 1) -> str | None:
        """The engine user for `model` (None: the base model), held in `Traffic` `count` times; 404 if unknown."""
        if model == self.base_name:
            return None
        stored = self.stored_name(caller, model)
        if stored is None:
            raise unknown_model(model)
        await self.traffic.enter(stored, count)
        if stored not in self.store:
            for _ in range(count):
                self.traffic.leave(stored)
            raise unknown_model(model)
        return stored

    def release(self, user: str | None, count: int) -> None:
        for _ in range(count if user is not None else 0):
            self.traffic.leave(user)


    async def close(self) -> None:
        """Finish the generations in flight, then stop the engine (the app's shutdown)."""
        self.closing = True
        await asyncio.to_thread(self.engine.close, True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
