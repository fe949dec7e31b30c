"""The caller's models and tunings: listed, uploaded (checked against the served model first), deleted.

A tuning is replaced or deleted only between requests: requests for it wait while it changes, and the
change waits for the requests in flight (`Traffic`), so each request sees one whole version.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

from ...engine import RequestError
from ...errors import ModelMismatchError, TuningError, UnknownUserError
from ...keys import Caller
from .schema import (
    TUNING_FILES,
    APIError,
    BodyTooLarge,
    quota_exceeded,
    revoked,
    scrub,
    tuning_card,
    unknown_model,
    upload_fields,
)


class Traffic:
    """Requests in flight per tuning, so that a tuning is replaced or deleted only between requests.

    The engine loads a tuning from the store when its request is admitted; a tuning deleted in
    between would fail the whole running batch, and one replaced while in use would keep serving
    the old weights. So a change waits for the tuning's requests to finish, and new requests for
    it wait for the change. Everything runs on the event loop, with no await between a check and
    its update: no locks needed.
    """

    def __init__(self):
        self.running: Counter[str] = Counter()
        self.changing: set[str] = set()
        self._waiters: list[asyncio.Future] = []

    async def _until(self, ready) -> None:
        while not ready():
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            await future

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def enter(self, name: str, count: int = 1) -> None:
        """Hold `name` for `count` requests (waits while it changes)."""
        await self._until(lambda: name not in self.changing)
        self.running[name] += count

    def leave(self, name: str) -> None:
        """One request for `name` is over (called from a task's finally: never waits)."""
        self.running[name] -= 1
        if self.running[name] <= 0:
            del self.running[name]
            self._wake()

    @asynccontextmanager
    async def change(self, name: str) -> AsyncIterator[None]:
        """Exclusive use of `name`: no request for it runs inside."""
        await self._until(lambda: name not in self.changing)
        self.changing.add(name)
        try:
            await self._until(lambda: not self.running[name])
            yield
        finally:
            self.changing.discard(name)
            self._wake()



class Tunings:
    """The caller's models and tunings: listed, uploaded (checked first), deleted."""

    def models(self, caller: Caller) -> dict:
        data = [self.base_model_card()] + [self.model_card(entry, name, caller) for name, entry in self.own_entries(caller)]
        return {"object": "list", "data": data}

    def model(self, caller: Caller, model: str) -> dict:
        if model == self.base_name:
            return self.base_model_card()
        stored = self.stored_name(caller, model)
        if stored is None or stored not in self.store:
            raise unknown_model(model)
        return self.model_card(self.store.entry(stored), model, caller)

    def base_model_card(self) -> dict:
        return {"id": self.base_name, "object": "model", "created": self.started, "owned_by": "slimtune"}

    @staticmethod
    def model_card(entry, name: str, caller: Caller) -> dict:
        return {"id": name, "object": "model", "created": int(entry.created), "owned_by": caller.id,
                "method": entry.kind}

    def tunings(self, caller: Caller) -> dict:
        return {"object": "list", "data": [tuning_card(entry, name) for name, entry in self.own_entries(caller)]}

    def tuning(self, caller: Caller, name: str) -> dict:
        stored = self.stored_name(caller, name)
        if stored is None or stored not in self.store:
            raise unknown_model(name, param="name")
        return tuning_card(self.store.entry(stored), name)

    async def upload(self, request: Request, caller: Caller) -> JSONResponse:
        """Store an uploaded tuning under the caller's name for it; nothing changes unless it is valid.

        The tuning is loaded against the served model before it is stored (every site and shape, its
        patterns resolved into module names, its task checked), so what is stored loads; a key has
        one upload checked at a time, the server `UPLOADS_AT_ONCE`."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "Upload a tuning as multipart/form-data: a field 'name' and the tuning's files as "
                                "'files' (slimtune.json + tuning.safetensors, or adapter_config.json + "
                                "adapter_model.safetensors).", param="files")
        if caller.id in self._uploading:
            raise APIError(429, "You have an upload in progress; send the next one when it is done.",
                           code="upload_in_progress", type="rate_limit_error")
        self._uploading.add(caller.id)
        try:
            return await self._upload(request, caller)
        finally:
            self._uploading.discard(caller.id)

    async def _upload(self, request: Request, caller: Caller) -> JSONResponse:
        try:
            form = await request.form(max_files=4, max_fields=8)
        except BodyTooLarge:
            raise
        except Exception as err:  # python-multipart's parse errors
            raise APIError(400, f"The multipart body could not be parsed: {err}", param="files") from err
        with self.store.scratch(".upload-") as folder:  # private, and known to Store.clean if the server dies
            try:
                name, replace, task = upload_fields(form)
                stored = self.stored_name(caller, name)
                if stored is None:
                    raise APIError(400, f"Invalid tuning name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
                                        f"starting with a letter or digit, and not the base model's name "
                                        f"'{self.base_name}'.", param="name")
                await self.receive_files(form.getlist("files"), folder)
            finally:
                await form.close()
            async with self.uploads, self.traffic.change(stored):
                if stored in self.store and not replace:
                    raise APIError(409, f"You already have a tuning named '{name}'; delete it first or upload with "
                                        "replace=true.", param="name", code="tuning_exists")
                self.check_quota(caller, stored, 0)  # before the costly check; again when storing
                record, tensors = await self.checked(folder, task)
                size = sum(t.numel() * t.element_size() for t in tensors.values())
                if not self.still_valid(caller):
                    raise revoked()
                entry = await asyncio.to_thread(self.store.add, stored, (record, tensors), None, replace,
                                                partial(self.check_quota, caller, stored, size))
                if not self.still_valid(caller):  # revoked while it was being stored: the revocation wins
                    await self.forget(stored)
                    raise revoked()
                await asyncio.to_thread(self.engine.remove, stored)  # a replaced tuning must be reloaded
        return JSONResponse(tuning_card(entry, name), 201)

    def check_quota(self, caller: Caller, stored: str, size: int) -> None:
        """403 if storing `size` bytes as `stored` would take the caller past its tunings or bytes. `Store.add` calls
        this under its lock (its `admit`), so replicas uploading at once cannot together pass it; it reads the
        caller's own entries only, as other replicas' loads wait for that lock."""
        others = [entry for own, entry in self.own_entries(caller) if f"{caller.id}.{own}" != stored]
        if len(others) >= self.max_tunings:
            raise quota_exceeded(f"You have {len(others)} tunings, the most a key may keep; delete one first.")
        if sum(entry.bytes for entry in others) + size > self.max_bytes:
            raise quota_exceeded(f"This tuning's {size} bytes would take your tunings past the {self.max_bytes} "
                                 "bytes a key may keep; delete some first.")

    async def checked(self, folder: Path, task: dict | None) -> tuple[dict, dict]:
        """The upload loaded against the served model (`Engine.check`), its errors as 400s without server paths."""
        try:
            return await asyncio.to_thread(self.engine.check, folder, task)
        except RequestError as err:
            raise APIError(400, f"{scrub(err, folder, self.store.path)}.", param=err.param or "task",
                           code="invalid_task") from err
        except ModelMismatchError as err:
            raise APIError(400, f"The tuning was made for another base model than '{self.base_name}': "
                                f"{scrub(err, folder, self.store.path)}", param="files", code="model_mismatch") from err
        except (TuningError, ValueError, KeyError) as err:
            raise APIError(400, f"The upload is not a valid tuning: {scrub(err, folder, self.store.path)}", param="files",
                           code="invalid_tuning") from err

    def still_valid(self, caller: Caller) -> bool:
        return caller.admin or caller.id in self.keys

    async def receive_files(self, files: list, folder: Path) -> None:
        """The uploaded files, written into `folder` (a private scratch folder of the store)."""
        names = [Path(getattr(f, "filename", None) or "").name for f in files]
        if not files or any(isinstance(f, str) for f in files):
            raise APIError(400, "No tuning files: send them as file parts named 'files'.", param="files")
        unknown = [n for n in names if n not in TUNING_FILES]
        if unknown or len(set(names)) != len(names):
            raise APIError(400, f"Unexpected files {sorted(set(unknown)) or names}: send each of "
                                f"{sorted(TUNING_FILES)} at most once (a saved tuning's folder).", param="files")
        for upload, name in zip(files, names, strict=True):
            with open(folder / name, "wb") as out:
                while chunk := await upload.read(2**20):
                    out.write(chunk)

    async def delete_tuning(self, caller: Caller, name: str) -> dict:
        stored = self.stored_name(caller, name)
        if stored is None:
            raise unknown_model(name, param="name")
        async with self.traffic.change(stored):
            if stored not in self.store:
                raise unknown_model(name, param="name")
            await self.forget(stored)
        return {"id": name, "object": "tuning", "deleted": True}

    async def forget(self, stored: str) -> None:
        """Delete from the store and the engine's bank (called inside `Traffic.change`)."""
        with contextlib.suppress(UnknownUserError):
            await asyncio.to_thread(self.store.delete, stored)
        await asyncio.to_thread(self.engine.remove, stored)

