"""`slimtune serve`: an OpenAI-compatible HTTP server over the batched `Engine`, with per-user keys.

Endpoints (all but `/health` need `Authorization: Bearer <key>`):

    POST   /v1/completions          OpenAI completions (stream: server-sent events ending in `data: [DONE]`)
    POST   /v1/chat/completions     OpenAI chat completions, through the tokenizer's chat template
    GET    /v1/models[/{model}]     the base model and the caller's own tunings
    POST   /v1/classify             {model, inputs} -> label probabilities, for classification tunings
    POST   /v1/tunings              upload a saved tuning: multipart form, field `name`, the tuning's files as
                                    `files` (slimtune.json + tuning.safetensors, or an HF PEFT folder's
                                    adapter_config.json + adapter_model.safetensors, or an AdapterHub
                                    folder's files), optional `replace=true`
                                    and `task` (JSON object: labels, label_words, template)
    GET    /v1/tunings[/{name}]     the caller's tunings;  DELETE /v1/tunings/{name}
    POST   /v1/keys, GET /v1/keys, DELETE /v1/keys/{id}     admin key only
    GET    /metrics                 Prometheus text format (any valid key)
    GET    /health                  no key: load balancers probe it; it tells nothing about users

A tuning belongs to the key that uploaded it and is stored as ``<key id>.<name>``: a key sees and
uses only its own tunings and the base model, and another key's tuning answers exactly as one that
does not exist. Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
400 for bad values (and prompts longer than the context), 401 for a missing or wrong key, 403 for
admin-only calls, 404 for unknown models, 409 for an upload over an existing name without
`replace`, 413 for bodies over the limit, 422 for a body that is not the expected JSON schema
(wrong types, missing fields).

A tuning is replaced or deleted only between requests: requests for it wait while it changes, and
the change waits for the requests in flight, so each request sees one whole version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pydantic_core
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import adapterhub_format, storage
from .engine import MAX_INPUTS, Completion, Engine, EngineClosedError, GenerationRequest, RequestError
from .errors import ModelMismatchError, TuningError, UnknownUserError
from .keys import ADMIN, Caller, KeyConfigError, KeyRing
from .store import Store

log = logging.getLogger("slimtune.server")

# The HTTP layer's own limits (the shape of a request); the values inside a request are the engine's to check.
MAX_BODY = 16 * 2**20  # bytes of a JSON request
MAX_UPLOAD = 512 * 2**20  # bytes of an uploaded tuning (a prefix tuning's MLP can be large)
MAX_PROMPTS = 128  # prompts in one completions request
MAX_MESSAGES = 2048  # messages in one chat request
MAX_TUNINGS_PER_KEY = 100
MAX_BYTES_PER_KEY = 2 * 2**30  # of tensors stored, over all of a key's tunings
MAX_REQUESTS_PER_KEY = 64  # generations (each prompt one) and classifications of one key in flight at once
UPLOADS_AT_ONCE = 2  # an upload costs a few times its size in memory while it is checked
# slimtune's own, PEFT's, and AdapterHub's (its adapter and, if saved with one, its head)
TUNING_FILES = {"slimtune.json", "tuning.safetensors", "adapter_config.json", "adapter_model.safetensors",
                *adapterhub_format.FILES}
TUNING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # leaves room for the owner's id in the store's 128


# --- errors ----------------------------------------------------------------------------------------


class APIError(Exception):
    """An answer in OpenAI's error shape: what was wrong (message) and which field (param)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, headers=headers)


class BodyTooLarge(Exception):
    """Raised while a request body is read, once it is past the limit."""

    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than the limit of {limit} bytes")
        self.limit = limit


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def quota_exceeded(message: str) -> APIError:
    return APIError(403, message, param="files", code="quota_exceeded")


def revoked() -> APIError:
    return APIError(401, "Your API key was revoked while the upload was in progress; nothing was stored.",
                    code="invalid_api_key")


def unknown_model(model: Any, param: str = "model") -> APIError:
    """The one answer for a model that does not exist *or belongs to another key*: names do not leak."""
    shown = model if isinstance(model, str) and len(model) <= 200 else f"{str(model)[:200]}..."
    return APIError(404, f"The model '{shown}' does not exist or you do not have access to it.", param=param,
                    code="model_not_found")


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(error_body(f"The request body is larger than the limit of {limit} bytes.", code="request_too_large"),
                        413)


# --- request bodies (types only: values are checked by the handlers, to answer 400 as OpenAI) ------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    # Lists counted before they are validated (a few microseconds each: validating 100,000 chat messages took
    # 0.7 s of the one interpreter lock everyone's requests share): {field: (most items, what they are)}.
    counted: ClassVar[dict[str, tuple[int, str]]] = {}


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # OpenAI options this server does not implement: refused when they would change the answer, not ignored.
    echo: bool | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    tools: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> str | None:
        """The first option set that this server cannot honour, if any."""
        used = {"echo": self.echo, "logprobs": self.logprobs not in (None, False, 0), "top_logprobs": self.top_logprobs,
                "best_of": self.best_of not in (None, 1), "suffix": self.suffix, "logit_bias": self.logit_bias,
                "frequency_penalty": self.frequency_penalty not in (None, 0), "tools": self.tools,
                "presence_penalty": self.presence_penalty not in (None, 0),
                "response_format": (self.response_format or {}).get("type", "text") != "text"}
        return next((name for name, value in used.items() if value), None)


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_Sampling):
    counted: ClassVar[dict[str, tuple[int, str]]] = {"messages": (MAX_MESSAGES, "messages")}
    messages: list[Message]
    max_completion_tokens: int | None = None


class ClassifyBody(_Body):
    counted: ClassVar[dict[str, tuple[int, str]]] = {"inputs": (MAX_INPUTS, "texts")}  # the engine's limit, early
    model: str
    inputs: str | list[str]


class KeyBody(_Body):
    name: str = ""


async def parse(request: Request, schema: type[BaseModel]) -> Any:
    """The request's JSON body as `schema`: 400 for JSON that does not parse or a list longer than its limit,
    422 for the wrong shape."""
    raw = await request.body()
    try:
        data = pydantic_core.from_json((raw or b"{}") if schema is KeyBody else raw)
    except ValueError as err:
        raise APIError(400, f"We could not parse the JSON body of your request ({err}); expected a JSON object.",
                       code="invalid_json") from None
    if isinstance(data, dict):
        for name, (most, what) in schema.counted.items():
            if isinstance(data.get(name), list) and len(data[name]) > most:
                raise APIError(400, f"{name} holds {len(data[name])} {what}; at most {most} per request.", param=name,
                               code="invalid_value")
    try:
        return schema.model_validate(data, strict=True)
    except ValidationError as err:
        param = ".".join(str(part) for part in err.errors()[0]["loc"]) or None
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:5])
        raise APIError(422, f"Invalid request body: {problems}.", param=param, code="invalid_type") from None


# --- tunings in use and changing --------------------------------------------------------------------


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


# --- one generation, consumed in its own task -------------------------------------------------------


class Run:
    """One engine generation, read in a task of its own into a queue shared by a request's choices.

    The task keeps reading after the HTTP side is gone (a client that disconnected): the
    generation is cancelled, and the tuning is released only once the engine has let go of it.
    """

    def __init__(self, index: int, generation, events: asyncio.Queue, on_end):
        self.index, self.generation, self.events, self.on_end = index, generation, events, on_end
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for delta in self.generation:
                self.events.put_nowait((self.index, "delta", delta))
            self.events.put_nowait((self.index, "done", await self.generation.wait()))
        except Exception as err:
            self.events.put_nowait((self.index, "error", err))
        finally:
            self.on_end()

    def cancel(self) -> None:
        self.generation.cancel()


# --- metrics -----------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
    ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    def __init__(self, engine: Engine):
        self.engine = engine
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = PromCounter("slimtune_http_requests", "HTTP requests answered, by endpoint, method and status",
                                    ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("slimtune_http_request_duration_seconds", "Time to answer a request (a stream: to its "
                                 "end), by endpoint", ["endpoint"], buckets=self.LATENCY, registry=r)
        self.batch_rows = Histogram("slimtune_batch_rows", "Rows (generations) per decoding step of the engine",
                                    buckets=self.ROWS, registry=r)
        self.in_flight = Gauge("slimtune_generations_in_flight", "Generations submitted and not finished", registry=r)
        self.resident = Gauge("slimtune_resident_tunings", "Tunings loaded in the engine's bank", registry=r)
        self.generated = Gauge("slimtune_generated_tokens", "Tokens generated since the start (a counter)", registry=r)
        self.steps = Gauge("slimtune_decoding_steps", "Decoding steps since the start (a counter)", registry=r)
        self.loads = Gauge("slimtune_tuning_loads", "Tunings loaded from the store since the start (a counter)", registry=r)
        self.evictions = Gauge("slimtune_tuning_evictions", "Tunings evicted from the bank since the start (a counter)",
                               registry=r)
        self.memory = Gauge("slimtune_tuning_bytes", "Bytes the resident tunings take beside the model (Bank.memory): "
                            "slot tables, tunings without a slot, the last batch layout's gathered parameters, values "
                            "kept between calls", ["part"], registry=r)
        self.compiled_steps = Gauge("slimtune_compiled_steps", "Decoding steps run by the compiled step (serve "
                                    "--compile) since the start (a counter)", registry=r)
        self.compiles = Gauge("slimtune_step_compiles", "Graphs the compiled decoding step made (batch shapes and "
                              "slot-table layouts seen), and the seconds they took", ["what"], registry=r)
        self._seen_steps = 0

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        """The engine's figures as of now, then the text format."""
        stats = self.engine.stats
        rows = list(stats.batch_rows)  # recent steps only: the engine keeps the last 1000
        new = min(stats.steps - self._seen_steps, len(rows))
        for n in rows[len(rows) - new:] if new > 0 else []:
            self.batch_rows.observe(n)
        self._seen_steps = stats.steps
        self.resident.set(len(self.engine.resident))
        self.generated.set(stats.generated_tokens)
        self.steps.set(stats.steps)
        self.loads.set(stats.loads)
        self.evictions.set(stats.evictions)
        self.compiled_steps.set(stats.compiled_steps)
        self.compiles.labels("graphs").set(stats.compiles)
        self.compiles.labels("seconds").set(stats.compile_seconds)
        for part, size in self.engine.memory().items():
            self.memory.labels(part).set(size)
        return generate_latest(self.registry)


class _Observe:
    """ASGI middleware: counts and times every HTTP request by its route (not its raw path: bounded labels)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route, handler = scope.get("route"), scope.get("endpoint")
            endpoint = getattr(route, "path", None) or getattr(handler, "__name__", None) or "unmatched"
            self.metrics.observe(endpoint, scope["method"], status, time.perf_counter() - start)


class _BodyLimit:
    """ASGI middleware: 413 for a body over the limit, told by Content-Length or counted as it arrives."""

    def __init__(self, app, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"].rstrip("/") == "/v1/tunings" else self.limit
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _too_large(limit)(scope, receive, send)
        received = 0

        async def receiving():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, receiving, send)


# --- the service ---------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A generation request checked and tokenised: what to submit, and how to answer."""

    model: str
    user: str | None  # the store name, or None for the base model
    prompts: list[list[int]]
    options: dict
    max_tokens: list[int]
    stream: bool
    include_usage: bool
    chat: bool
    holds: int = 0  # requests held in `Traffic` for `user`
    tenant: str = ""  # the caller's key id: whose share of the engine it is


class Service:
    """What the routes do; `create_app` wires it to HTTP."""

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

    # generation

    async def prepare(self, caller: Caller, body: CompletionBody | ChatBody, chat: bool) -> Prepared:
        """Check a request's values and tokenise it; holds its tuning (the caller must release it on failure)."""
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported: this server makes one choice per prompt (n=1).", param="n")
        if (option := body.unsupported()) is not None:
            raise APIError(400, f"{option} is not supported by this server; leave it unset.", param=option,
                           code="unsupported_parameter")
        options = sampling_options(body)
        if chat:
            prompts = await asyncio.to_thread(self.chat_prompt, body.messages)  # templating and tokenising: off the loop
        else:
            prompts = await asyncio.to_thread(self.completion_prompts, body.prompt)
        chosen = body.max_completion_tokens if chat and body.max_completion_tokens is not None else None
        requested = chosen if chosen is not None else body.max_tokens
        param = "max_completion_tokens" if chosen is not None else "max_tokens"
        user = await self.hold(caller, body.model, len(prompts))
        try:
            virtual = self.engine.virtual_tokens(user)
            limits = [self.max_tokens(requested, len(ids) + virtual, chat, param) for ids in prompts]
        except BaseException:
            self.release(user, len(prompts))
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(body.model, user, prompts, options, limits, bool(body.stream), include_usage, chat, len(prompts),
                        caller.id)

    def completion_prompts(self, prompt: str | list) -> list[list[int]]:
        """OpenAI's four prompt forms (text, tokens, a batch of either) as lists of token ids."""
        if isinstance(prompt, str):
            batch: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            batch = [prompt]
        else:
            batch = prompt
        if not batch:
            raise APIError(400, "prompt is an empty list: give a string, a list of token ids, or a list of those.",
                           param="prompt")
        if len(batch) > MAX_PROMPTS:
            raise APIError(400, f"prompt holds {len(batch)} prompts; at most {MAX_PROMPTS} per request.", param="prompt")
        for p in batch:
            self.check_length(len(p) if isinstance(p, str) else 0, "prompt")
        prompts = [self.engine.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in batch]
        vocab = len(self.engine.tokenizer)
        for ids in prompts:
            if not ids:
                raise APIError(400, "The prompt is empty: give at least one token.", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"The prompt's token ids must be within the vocabulary (0 to {vocab - 1}).",
                               param="prompt")
        return prompts

    def chat_prompt(self, messages: list[Message]) -> list[list[int]]:
        """The conversation through the tokenizer's chat template, ending in the assistant's cue."""
        tokenizer = self.engine.tokenizer
        if not messages:
            raise APIError(400, "messages is empty: give at least one message.", param="messages")
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"The base model '{self.base_name}' has no chat template; use /v1/completions.",
                           param="messages")
        plain = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(messages)]
        self.check_length(sum(len(m["role"]) + len(m["content"]) for m in plain), "messages")
        try:
            text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja's errors, e.g. a template that wants alternating roles
            raise APIError(400, f"The chat template refused these messages: {err}", param="messages") from err
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "The conversation is empty once templated.", param="messages")
        return [ids]

    def check_length(self, characters: int, param: str) -> None:
        """Refuse text that could not fit the context before tokenising it (no token is longer than the longest)."""
        if characters > self.engine.max_prompt_chars:
            raise APIError(400, f"This model's maximum context length is {self.engine.max_length} tokens, and your "
                                f"{param} has {characters} characters, more than that many tokens could hold. Please "
                                "reduce the length of the prompt.", param=param, code="context_length_exceeded")

    def max_tokens(self, requested: int | None, used: int, chat: bool, param: str) -> int:
        """`max_tokens` checked against the context; its default: 16 (completions) or the rest of the context (chat)."""
        context = self.engine.max_length
        room = context - used
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, your "
                                f"{'messages' if chat else 'prompt'} use {used} tokens, leaving no room for a completion. "
                                "Please reduce the length of the prompt.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if requested is None:
            return room if chat else min(16, room)
        if requested < 1:
            raise APIError(400, f"{param} must be at least 1, got {requested}.", param=param, code="invalid_value")
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{used + requested} tokens ({used} in the {'messages' if chat else 'prompt'}; {requested} "
                                f"for the completion). Please reduce the length of the prompt or of {param}.",
                           param=param, code="context_length_exceeded")
        return requested

    def start(self, prepared: Prepared) -> tuple[list[Run], asyncio.Queue]:
        """Submit every prompt of a request as the caller's (the engine shares its time fairly between keys);
        each run releases its hold on the tuning when it ends."""
        events: asyncio.Queue = asyncio.Queue()
        runs: list[Run] = []
        loop = asyncio.get_running_loop()
        try:
            self.enter(prepared.tenant, len(prepared.prompts))
        except APIError:
            self.release(prepared.user, prepared.holds)
            raise
        try:
            for i, (ids, limit) in enumerate(zip(prepared.prompts, prepared.max_tokens, strict=True)):
                generation = self.engine.submit(GenerationRequest(prepared.user, ids, max_new_tokens=limit,
                                                                  tenant=prepared.tenant, **prepared.options), loop=loop)
                self.metrics.in_flight.inc()
                runs.append(Run(i, generation, events, partial(self._ended, prepared.user, prepared.tenant)))
                self._keep(runs[-1].task)
        except BaseException as err:
            for run in runs:
                run.cancel()
            self.release(prepared.user, prepared.holds - len(runs))
            self.leave(prepared.tenant, len(prepared.prompts) - len(runs))
            if isinstance(err, Exception):
                raise engine_error(err, prepared.model, prepared.user) from err
            raise
        return runs, events

    def _ended(self, user: str | None, tenant: str) -> None:
        self.metrics.in_flight.dec()
        self.release(user, 1)
        self.leave(tenant, 1)

    def enter(self, tenant: str, count: int) -> None:
        """Count `count` more requests of a key in flight; 429 past its limit (one key cannot fill the queue)."""
        if self._in_flight[tenant] + count > self.max_requests:
            raise APIError(429, f"You have {self._in_flight[tenant]} requests in flight, and this one would take you "
                                f"past the {self.max_requests} a key may have at once; wait for some to finish.",
                           code="too_many_requests", type="rate_limit_error")
        self._in_flight[tenant] += count

    def leave(self, tenant: str, count: int) -> None:
        self._in_flight[tenant] -= count
        if self._in_flight[tenant] <= 0:
            del self._in_flight[tenant]

    def _keep(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def collect(self, request: Request, runs: list[Run], events: asyncio.Queue, model: str) -> list[Completion]:
        """Every run's result; a client that hangs up cancels the runs (their slots free at the next step)."""
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(request, runs))
        results: dict[int, Completion] = {}
        try:
            while len(results) < len(runs):
                index, kind, value = await events.get()
                if kind == "error":
                    raise engine_error(value, model)
                if kind == "done":
                    results[index] = value
        finally:
            watcher.cancel()
            if len(results) < len(runs):
                for run in runs:
                    run.cancel()
        return [results[i] for i in range(len(runs))]

    async def stream(self, runs: list[Run], events: asyncio.Queue, prepared: Prepared) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them; leaving early (client gone) cancels the runs."""
        shape = ChunkShape(prepared, f"{'chatcmpl' if prepared.chat else 'cmpl'}-{secrets.token_hex(12)}", int(time.time()))
        done: dict[int, Completion] = {}
        try:
            if prepared.chat:
                for run in runs:
                    yield sse(shape.chunk(run.index, {"role": "assistant", "content": ""}, None))
            while len(done) < len(runs):
                index, kind, value = await events.get()
                if kind == "error":
                    error = engine_error(value, prepared.model, prepared.user)
                    yield sse(error_body(error.message, error.type, error.param, error.code))
                    return
                if kind == "delta":
                    yield sse(shape.chunk(index, {"content": value} if prepared.chat else value, None))
                else:
                    done[index] = value
                    yield sse(shape.chunk(index, {} if prepared.chat else "", value.finish_reason))
            if prepared.include_usage:
                yield sse(shape.usage([done[i] for i in range(len(runs))]))
            yield "data: [DONE]\n\n"
        finally:
            if len(done) < len(runs):
                for run in runs:
                    run.cancel()

    async def generate(self, request: Request, caller: Caller, chat: bool) -> Response:
        body = await parse(request, ChatBody if chat else CompletionBody)
        prepared = await self.prepare(caller, body, chat)
        runs, events = self.start(prepared)
        if prepared.stream:
            return StreamingResponse(self.stream(runs, events, prepared), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await self.collect(request, runs, events, prepared.model)
        return JSONResponse(completion_body(prepared, results))

    # classification

    async def classify(self, request: Request, caller: Caller) -> dict:
        body = await parse(request, ClassifyBody)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if not texts:
            raise APIError(400, "inputs is empty: give a string or a list of strings.", param="inputs")
        user = await self.hold(caller, body.model)
        try:
            if user is None:
                raise APIError(400, f"'{body.model}' is the base model; classification needs a classification tuning.",
                               param="model")
            self.enter(caller.id, 1)
            try:  # the engine checks the tuning's task (off the event loop) and the inputs
                answers = await self.engine.aclassify(user, texts, tenant=caller.id)
            except Exception as err:
                raise engine_error(err, body.model, user) from err
            finally:
                self.leave(caller.id, 1)
        finally:
            self.release(user, 1)
        data = [{"object": "classification", "index": i, "label": max(probs, key=probs.get), "probabilities": probs}
                for i, probs in enumerate(answers)]
        return {"object": "list", "model": body.model, "data": data}

    # models and tunings

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
                others = [entry for own, entry in self.own_entries(caller) if own != name]
                if len(others) >= self.max_tunings:
                    raise quota_exceeded(f"You have {len(others)} tunings, the most a key may keep; delete one first.")
                record, tensors = await self.checked(folder, task)
                size = sum(t.numel() * t.element_size() for t in tensors.values())
                if sum(entry.bytes for entry in others) + size > self.max_bytes:
                    raise quota_exceeded(f"This tuning's {size} bytes would take your tunings past the {self.max_bytes} "
                                         "bytes a key may keep; delete some first.")
                if not self.still_valid(caller):
                    raise revoked()
                entry = await asyncio.to_thread(self.store.add, stored, (record, tensors), None, replace)
                if not self.still_valid(caller):  # revoked while it was being stored: the revocation wins
                    await self.forget(stored)
                    raise revoked()
                await asyncio.to_thread(self.engine.remove, stored)  # a replaced tuning must be reloaded
        return JSONResponse(tuning_card(entry, name), 201)

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

    # keys

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

    async def close(self) -> None:
        """Finish the generations in flight, then stop the engine (the app's shutdown)."""
        self.closing = True
        await asyncio.to_thread(self.engine.close, True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)


# --- small pieces ------------------------------------------------------------------------------------


def sampling_options(body: _Sampling) -> dict:
    """temperature, top_p, seed and stop with OpenAI's defaults (temperature 1), checked by the engine's rules."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    request = GenerationRequest(None, [], temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stop)
    try:
        request.check()
    except RequestError as err:
        raise APIError(400, f"{err}.", param=err.param, code="invalid_value") from None
    return {"temperature": float(request.temperature), "top_p": float(request.top_p), "seed": request.seed,
            "stop": request.stop}


def message_text(message: Message, index: int) -> str:
    """A message's text: a string, or the text parts of a list (other parts are refused, not dropped)."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages.{index}.content: only text parts are supported, got a {part.type!r} part.",
                           param=f"messages.{index}.content")
        parts.append(part.text)
    return "".join(parts)


def upload_fields(form) -> tuple[str, bool, dict | None]:
    """The form's `name`, `replace` and `task` fields, checked."""
    name = form.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, "The upload needs a form field 'name': the tuning's name.", param="name")
    replace_field = form.get("replace", "false")
    if not isinstance(replace_field, str) or replace_field.lower() not in ("true", "false", "1", "0"):
        raise APIError(400, f"replace must be 'true' or 'false', got {replace_field!r}.", param="replace")
    task_field = form.get("task")
    task = None
    if task_field is not None:
        try:
            task = storage.load_json(task_field, "the task field") if isinstance(task_field, str) else None
        except TuningError as err:
            raise APIError(400, f"{err}; expected a JSON object, e.g. {{\"kind\": \"classification\", \"labels\": "
                                "[...]}.", param="task", code="invalid_task") from None
        if not isinstance(task, dict):
            raise APIError(400, "task must be a JSON object, e.g. {\"kind\": \"classification\", \"labels\": [...]}.",
                           param="task", code="invalid_task")
    return name, replace_field.lower() in ("true", "1"), task


def scrub(err: Exception, *folders: Path) -> str:
    """An error's message without the server's own paths (the store, a private upload folder) in it."""
    message = str(err)
    for folder in folders:
        message = message.replace(str(folder), "the upload" if folder.name.startswith(".upload-") else "the store")
    return message


def internal_error(err: BaseException, what: str) -> APIError:
    """A 500 that says nothing of the server's insides: the details go to the log, under an id the client can quote."""
    request_id = f"req-{secrets.token_hex(8)}"
    log.error("%s failed (%s): %s: %s", what, request_id, type(err).__name__, err, exc_info=err)
    return APIError(500, f"The server had an internal error while processing your request; quote the request id "
                         f"{request_id} if you report it.", type="server_error", code="internal_error")


def tuning_card(entry, name: str) -> dict:
    return {"id": name, "object": "tuning", "created": int(entry.created), "method": entry.method, "bytes": entry.bytes,
            "task": entry.task}


def engine_error(err: BaseException, model: str, stored: str | None = None) -> BaseException:
    """The HTTP answer for an error the engine raised; `stored`, the store's name of the tuning `model`, is
    said in the caller's words."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, UnknownUserError):
        return unknown_model(model)
    if isinstance(err, RequestError):
        message = str(err) if stored is None else str(err).replace(repr(stored), f"'{model}'").replace(stored, model)
        return APIError(400, f"{message}.", param=err.param, code="invalid_value")
    if isinstance(err, EngineClosedError):
        return APIError(503, "The server is shutting down and takes no new requests.", type="server_error")
    if isinstance(err, Exception):
        return internal_error(err, f"a request for '{str(model)[:100]}'")
    return err  # CancelledError and friends pass through


def usage(results: list[Completion]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(prepared: Prepared, results: list[Completion]) -> dict:
    """A whole (non-streamed) answer, as OpenAI's `text_completion` or `chat.completion`."""
    if prepared.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                    "finish_reason": r.finish_reason} for i, r in enumerate(results)]
    else:
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
    return {"id": f"{'chatcmpl' if prepared.chat else 'cmpl'}-{secrets.token_hex(12)}",
            "object": "chat.completion" if prepared.chat else "text_completion", "created": int(time.time()),
            "model": prepared.model, "choices": choices, "usage": usage(results)}


@dataclass
class ChunkShape:
    """The frame of every streamed chunk of one response."""

    prepared: Prepared
    id: str
    created: int

    def frame(self, choices: list) -> dict:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.prepared.chat else "text_completion",
                "created": self.created, "model": self.prepared.model, "choices": choices}
        if self.prepared.include_usage:
            body["usage"] = None
        return body

    def chunk(self, index: int, delta: dict | str, reason: str | None) -> dict:
        if self.prepared.chat:
            return self.frame([{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}])
        return self.frame([{"index": index, "text": delta, "logprobs": None, "finish_reason": reason}])

    def usage(self, results: list[Completion]) -> dict:
        return {**self.frame([]), "usage": usage(results)}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def watch_disconnect(request: Request, runs: list[Run]) -> None:
    """Cancel the runs when the client hangs up (the body is read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for run in runs:
                run.cancel()
            return


# --- the app -----------------------------------------------------------------------------------------


def create_app(engine: Engine, store: Store, keys: KeyRing, base_name: str, *, max_body: int = MAX_BODY,
               max_upload: int = MAX_UPLOAD, max_tunings_per_key: int = MAX_TUNINGS_PER_KEY,
               max_bytes_per_key: int = MAX_BYTES_PER_KEY, max_requests_per_key: int = MAX_REQUESTS_PER_KEY) -> FastAPI:
    """The HTTP app over `engine` (whose tunings come from `store`). Its shutdown closes the engine,
    after finishing the generations in flight."""
    service = Service(engine, store, keys, base_name, max_tunings=max_tunings_per_key, max_bytes=max_bytes_per_key,
                      max_requests=max_requests_per_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await service.close()

    app = FastAPI(title="slimtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    install_error_handlers(app)
    add_routes(app, service)
    app.add_middleware(_BodyLimit, limit=max_body, upload_limit=max_upload)
    app.add_middleware(_Observe, metrics=service.metrics)
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, whatever raised it."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, err: BodyTooLarge):
        return _too_large(err.limit)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = f"Unknown route: {request.method} {request.url.path}" if err.status_code == 404 else str(err.detail)
        return JSONResponse(error_body(message), err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        return JSONResponse(error_body(f"Invalid request: {problems}.", code="invalid_type"), 422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        return internal_error(err, f"{request.method} {request.url.path}").response()


def add_routes(app: FastAPI, service: Service) -> None:
    caller = Depends(service.authenticate)

    @app.get("/health")
    async def health():
        if service.closing:
            return JSONResponse({"status": "shutting down"}, 503)
        return {"status": "ok", "model": service.base_name}

    @app.get("/metrics")
    async def metrics(who: Caller = caller):
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(who: Caller = caller):
        return service.models(who)

    @app.get("/v1/models/{model}")
    async def model(model: str, who: Caller = caller):
        return service.model(who, model)

    @app.post("/v1/completions")
    async def completions(request: Request, who: Caller = caller):
        return await service.generate(request, who, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, who: Caller = caller):
        return await service.generate(request, who, chat=True)

    @app.post("/v1/classify")
    async def classify(request: Request, who: Caller = caller):
        return await service.classify(request, who)

    @app.post("/v1/tunings")
    async def upload(request: Request, who: Caller = caller):
        return await service.upload(request, who)

    @app.get("/v1/tunings")
    async def tunings(who: Caller = caller):
        return service.tunings(who)

    @app.get("/v1/tunings/{name}")
    async def tuning(name: str, who: Caller = caller):
        return service.tuning(who, name)

    @app.delete("/v1/tunings/{name}")
    async def delete_tuning(name: str, who: Caller = caller):
        return await service.delete_tuning(who, name)

    @app.post("/v1/keys")
    async def create_key(request: Request, who: Caller = caller):
        return await service.create_key(request, who)

    @app.get("/v1/keys")
    async def list_keys(who: Caller = caller):
        return service.list_keys(who)

    @app.delete("/v1/keys/{key_id}")
    async def delete_key(key_id: str, who: Caller = caller):
        return await service.delete_key(who, key_id)


# --- running it ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread (tests, benchmarks); yields its base URL.
    Leaving the block shuts the server down gracefully (in-flight requests finish, the engine closes)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, name="slimtune-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def base_name_of(model: str) -> str:
    """The name clients use for the base model: a named model's name, or a folder's own name."""
    return Path(model).name if os.sep in model or model.startswith((".", "~")) else model


def serve(model: str = "smollm2-135m", store: str | os.PathLike = "slimtune-store", host: str = "127.0.0.1",
          port: int = 8000, admin_key_file: str | os.PathLike | None = None, max_resident: int = 64,
          max_batch: int = 32, max_tunings_per_key: int = MAX_TUNINGS_PER_KEY,
          max_bytes_per_key: int = MAX_BYTES_PER_KEY, max_requests_per_key: int = MAX_REQUESTS_PER_KEY,
          log_level: str = "info", compile: bool = False, quantize: str | None = None) -> None:
    """Open the model and the store, and serve until interrupted (Ctrl-C finishes in-flight requests).
    `compile`: decoding steps through torch.compile (see `Engine`); `quantize`: the base's linear weights stored
    quantised (see `slimtune.quantize`)."""
    import torch
    import uvicorn

    from .keys import read_admin_key
    from .models import load_model

    admin_key = read_admin_key(admin_key_file)  # before loading the model: no key, no start
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    base, tokenizer = load_model(model, "generation", quantize=quantize)
    if torch.cuda.is_available():
        base.cuda()
    tunings = Store(store, base)  # opened with its model: made private, and what crashes left is removed
    if tunings.cleaned:
        log.warning("removed %d things that interrupted uploads and writes left in the store: %s", len(tunings.cleaned),
                    ", ".join(tunings.cleaned[:20]) + (", ..." if len(tunings.cleaned) > 20 else ""))
    keys = KeyRing(tunings.path / "keys.json", admin_key)
    engine = Engine(base, tokenizer, tunings, max_resident=max_resident, max_batch=max_batch, compile=compile)
    app = create_app(engine, tunings, keys, base_name_of(model), max_tunings_per_key=max_tunings_per_key,
                     max_bytes_per_key=max_bytes_per_key, max_requests_per_key=max_requests_per_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)


