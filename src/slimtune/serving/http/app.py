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

Errors have OpenAI's shape: 400 for bad values (and prompts longer than the context), 401 for a missing
or wrong key, 403 for admin-only calls, 404 for unknown models, 409 for an upload over an existing name
without `replace`, 413 for bodies over the limit, 422 for a body that is not the expected JSON schema
(wrong types, missing fields).

This module wires the service (`service.py`) to FastAPI; `serving.ray` runs the same app as replicas.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...engine import Engine
from ...keys import Caller, KeyRing
from ...store import Store
from .metrics import Observe
from .schema import (
    MAX_BODY,
    MAX_BYTES_PER_KEY,
    MAX_REQUESTS_PER_KEY,
    MAX_TUNINGS_PER_KEY,
    MAX_UPLOAD,
    APIError,
    BodyTooLarge,
    error_body,
    internal_error,
    too_large,
)
from .service import Service

log = logging.getLogger("slimtune.server")


class BodyLimit:
    """ASGI middleware: 413 for a body over the limit, told by Content-Length or counted as it arrives."""

    def __init__(self, app, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"].rstrip("/") == "/v1/tunings" else self.limit
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await too_large(limit)(scope, receive, send)
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
    app.add_middleware(BodyLimit, limit=max_body, upload_limit=max_upload)
    app.add_middleware(Observe, metrics=service.metrics)
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, whatever raised it."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, err: BodyTooLarge):
        return too_large(err.limit)

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


@dataclass(frozen=True)
class ServerOptions:
    """What `slimtune serve` opens: the model, the store, and the engine's and each key's limits."""

    model: str = "smollm2-135m"
    store: str = "slimtune-store"
    max_resident: int = 64
    max_batch: int = 32
    max_tunings_per_key: int = MAX_TUNINGS_PER_KEY
    max_bytes_per_key: int = MAX_BYTES_PER_KEY
    max_requests_per_key: int = MAX_REQUESTS_PER_KEY
    compile: bool = False
    quantize: str | None = None

    @property
    def base_name(self) -> str:
        return base_name_of(self.model)


def open_app(options: ServerOptions, admin_key: str) -> FastAPI:
    """Load the model, open the store (made private; what crashes left is removed) and its keys, and make the app:
    one process's server, or one replica's."""
    import torch

    from ...models import load_model

    base, tokenizer = load_model(options.model, "generation", quantize=options.quantize)
    if torch.cuda.is_available():
        base.cuda()
    tunings = Store(options.store, base)
    if tunings.cleaned:
        log.warning("removed %d things that interrupted uploads and writes left in the store: %s", len(tunings.cleaned),
                    ", ".join(tunings.cleaned[:20]) + (", ..." if len(tunings.cleaned) > 20 else ""))
    keys = KeyRing(tunings.path / "keys.json", admin_key)
    engine = Engine(base, tokenizer, tunings, max_resident=options.max_resident, max_batch=options.max_batch,
                    compile=options.compile)
    return create_app(engine, tunings, keys, options.base_name, max_tunings_per_key=options.max_tunings_per_key,
                      max_bytes_per_key=options.max_bytes_per_key, max_requests_per_key=options.max_requests_per_key)


def serve(options: ServerOptions, host: str = "127.0.0.1", port: int = 8000,
          admin_key_file: str | os.PathLike | None = None, log_level: str = "info", replicas: int = 0,
          ray_address: str | None = None) -> None:
    """Serve until interrupted (Ctrl-C finishes in-flight requests): in this process, or with `replicas` as that many
    replicas on Ray Serve (`serving.ray`; a local Ray instance, or the cluster at `ray_address`)."""
    from ...keys import read_admin_key

    admin_key = read_admin_key(admin_key_file)  # before loading the model: no key, no start
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    if replicas:
        try:
            from .. import ray as on_ray
        except ImportError as err:
            raise SystemExit(f"slimtune serve --replicas needs Ray Serve ({err}): pip install 'slimtune[ray]'") from err

        on_ray.serve(options, admin_key, replicas=replicas, host=host, port=port, address=ray_address)
        return
    import uvicorn

    uvicorn.run(open_app(options, admin_key), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
