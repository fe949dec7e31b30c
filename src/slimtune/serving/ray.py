"""`slimtune serve --replicas N`: N engine replicas on Ray Serve, sharing one store, routed by tuning.

    client ──HTTP──▶ Ray Serve's proxy ──▶ Ingress ──handle, routed by tuning──▶ Replica 1 … N
                                                                             (the single-process app)

- **Replica**: one process's whole server (`http.app.open_app`: model, engine, store, keys), driven as an
  ASGI app from Ray. Every route, key check, error and limit is the single-process server's own code.
- **Ingress**: reads the request (with the server's body limits), and forwards it to a replica. A
  completion, chat or classification request for a tuning carries a *routing key*: a hash of the caller's
  key and the model's name (the tuning as that key knows it), carried as the request's multiplexed model id.
  Our request router (`TuningAffinity`) sends each key to the replica that ranks it first, so each tuning
  stays resident where its requests go. The ingress reads no key and no store: it cannot tell whose a
  tuning is, and the id is never shown. Base-model requests, uploads, listings and key calls go to any
  replica.
- **Faults**: a replica that dies before it has answered gets its request sent once more, to another
  replica, when the request changes nothing (generation, classification, reads); otherwise, and when it
  dies part-way through a streamed answer, the client gets a 503 (or, in a stream, a last error event)
  saying so. Ray Serve restarts the replica, which opens the store again and serves from it.

The store is shared: a key, a tuning uploaded, replaced or deleted through one replica is seen by the
others at their next request (see `slimtune.store` and `slimtune.keys` for the bound and for what a shared
file system must provide). Limits counted in memory stay per replica: requests in flight per key, and one
upload at a time per key.
"""


import asyncio
import contextlib
import hashlib
import logging
import os
import random
import signal
import time
from collections.abc import AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve as ray_serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .http.app import BodyLimit, ServerOptions, open_app
from .http.metrics import rows_since
from .http.schema import MAX_BODY, MAX_UPLOAD, error_body, sse

log = logging.getLogger("slimtune.server")

ROUTED = ("/v1/completions", "/v1/chat/completions", "/v1/classify")  # the requests that use a tuning
CHANGES_NOTHING = {("POST", path) for path in ROUTED}  # safe to send again; and every GET
STREAMED = b"text/event-stream"
APP_NAME = "slimtune"
REPLICA_HEADER = b"x-slimtune-replica"
# A replica takes this many keys' worth of requests in flight (`max_requests_per_key` each) before Ray Serve holds
# the next one back: requests held there wait in arrival order, unseen by the engine's fair share between keys, so
# a replica must take several keys' full share, or one key could fill it and queue every other key behind it.
REQUESTS_PER_REPLICA = 4


def routing_key(method: str, path: str, headers: dict[str, str], body: bytes, base_name: str) -> str:
    """The multiplexed model id of a request ("" for one that may go anywhere): the same for every request of
    one key for one tuning, and telling nothing of either."""
    if method != "POST" or path.rstrip("/") not in ROUTED:
        return ""
    import pydantic_core

    try:
        model = pydantic_core.from_json(body).get("model")
    except (ValueError, AttributeError):
        return ""  # the replica answers what is wrong with the body
    if not isinstance(model, str) or model == base_name:
        return ""
    key = headers.get("authorization", "").partition(" ")[2].strip()
    return hashlib.sha256(f"{key}\0{model}".encode()).hexdigest()[:32]


class TuningAffinity(RequestRouter):
    """Ray Serve's choice of replica for each request: one with a routing key goes to the replica that ranks its
    key highest (rendezvous hashing: each key's first choice is stable while the replicas stay, keys spread evenly,
    and a replica that leaves moves only its own keys), and on to the next ranked when that one is full
    (`max_ongoing_requests`), so a hot tuning spills over rather than queues. Requests without a key go to the
    less busy of two replicas at random, as Ray Serve's default router does. Not FIFO (`FIFOMixin` hands the replica
    chosen for one request to the oldest waiting one, whatever its key): each request gets the replica chosen for it."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not key:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = sorted(candidate_replicas, key=lambda r: hashlib.sha256(f"{key}/{r.replica_id.unique_id}".encode()).digest())
        return [[r] for r in ranked]


def _retryable(method: str, path: str) -> bool:
    return method == "GET" or (method, path.rstrip("/")) in CHANGES_NOTHING


async def run_asgi(app, method: str, path: str, query: bytes, headers: list, body: bytes) -> AsyncIterator[tuple]:
    """One HTTP request through an ASGI app, in this process: ("whole", status, headers, body) for an ordinary
    answer, or ("start", status, headers) then ("chunk", bytes)... for a stream. Leaving early (the client is
    gone) tells the app the client disconnected, which cancels its generations."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 0), "server": ("slimtune", 80)}
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await messages.put(message)

    task = asyncio.get_running_loop().create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        start = await messages.get()
        if start is None or start["type"] != "http.response.start":
            task.result()  # the app's own error, if it raised one
            raise RuntimeError("the app ended without an answer")
        status, answer_headers = start["status"], start.get("headers", [])
        streamed = dict(answer_headers).get(b"content-type", b"").startswith(STREAMED)
        parts = []
        if streamed:
            yield ("start", status, answer_headers)
        while (message := await messages.get()) is not None:
            if message["type"] != "http.response.body":
                continue
            if message.get("body"):
                if streamed:
                    yield ("chunk", message["body"])
                else:
                    parts.append(message["body"])
            if not message.get("more_body"):
                break
        if not streamed:
            yield ("whole", status, answer_headers, b"".join(parts))
    finally:
        gone.set()
        await asyncio.wait([task], timeout=30)
        if task.done() and not task.cancelled():
            task.exception()  # the app's own error handler has answered and logged it


def application(options: ServerOptions, admin_key: str, replicas: int, threads: int | None = None,
                routed: bool = True):
    """The Ray Serve application: the ingress bound to `replicas` replicas of the server, each with `threads` torch
    threads (default: this machine's cores shared out). `routed=False` sends every request anywhere (a benchmark's
    baseline: Ray Serve's balancing without routing by tuning)."""
    import torch

    threads = threads or max(1, (os.cpu_count() or 1) // replicas)

    @ray_serve.deployment(name="Replica", num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=REQUESTS_PER_REPLICA * options.max_requests_per_key, health_check_period_s=2,
                      graceful_shutdown_timeout_s=30,
                      request_router_config=RequestRouterConfig(request_router_class=TuningAffinity))
    class Replica:
        def __init__(self):
            torch.set_num_threads(threads)
            self.app = open_app(options, admin_key)
            self.service = self.app.state.service
            self.id = ray_serve.get_replica_context().replica_id.unique_id.encode()
            self.figures = ReplicaFigures(self.service.engine)

        async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes) -> AsyncIterator[tuple]:
            async for part in run_asgi(self.app, method, path, query, headers, body):
                if part[0] != "chunk":  # which replica answered: for operators, and to tell replicas apart in tests
                    part = (*part[:2], [*part[2], (REPLICA_HEADER, self.id)], *part[3:])
                yield part
            self.figures.update()

        def __del__(self):
            service = getattr(self, "service", None)
            if service is not None:
                service.closing = True
                service.engine.close(False)

    ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    ingress_app.add_middleware(BodyLimit, limit=MAX_BODY, upload_limit=MAX_UPLOAD)

    @ray_serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    @ray_serve.ingress(ingress_app)
    class Ingress:
        def __init__(self, replica):
            self.replica = replica

        @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"])
        async def forward(self, request: Request) -> Response:
            body = await request.body()
            method, path = request.method, request.url.path
            headers = [(k, v) for k, v in request.headers.raw if k.lower() not in (b"host", b"content-length")]
            routing = routing_key(method, path, dict(request.headers), body, options.base_name) if routed else ""
            handle = self.replica.options(stream=True, multiplexed_model_id=routing)
            for attempt in (1, 2):
                answer = handle.handle.remote(method, path, request.url.query.encode(), headers, body)
                try:
                    first = await answer.__anext__()
                    break
                except (RayActorError, StopAsyncIteration) as err:
                    if attempt == 2 or not _retryable(method, path):
                        log.warning("a replica stopped while answering %s %s: %s", method, path, type(err).__name__)
                        return replica_lost(_retryable(method, path))
                except Exception as err:  # Ray Serve's own (no replica running, back-pressure): nothing was sent
                    log.warning("no replica took %s %s: %s: %s", method, path, type(err).__name__, err)
                    return JSONResponse(error_body("No server replica could take your request now; send it again "
                                                   "shortly.", "server_error", code="replica_unavailable"), 503)
            if first[0] == "whole":
                _, status, answer_headers, content = first
                return Response(content, status, headers=_plain(answer_headers))
            _, status, answer_headers = first
            return StreamingResponse(_rest(answer), status, headers=_plain(answer_headers))

    def replica_lost(changes_nothing: bool) -> JSONResponse:
        tail = ("nothing was generated; send the request again." if changes_nothing else
                "it may or may not have taken effect: check (e.g. GET /v1/tunings or /v1/keys) before sending it again.")
        return JSONResponse(error_body(f"The server replica handling your request stopped; {tail}", "server_error",
                                       code="replica_stopped"), 503)

    return Ingress.bind(Replica.bind())


class ReplicaFigures:
    """Each replica's resident tunings and rows per decoding step, as Ray metrics (tagged with the replica by Ray
    Serve, exported by each node's metrics agent beside Ray Serve's own): `/metrics` through the proxy answers for
    one replica only."""

    def __init__(self, engine):
        from ray.serve import metrics

        self.engine, self.seen = engine, 0
        self.resident = metrics.Gauge("slimtune_resident_tunings", "Tunings loaded in this replica's bank")
        self.loads = metrics.Gauge("slimtune_tuning_loads", "Tunings this replica loaded from the store (a counter)")
        self.rows = metrics.Histogram("slimtune_batch_rows", "Rows (generations) per decoding step",
                                      boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])

    def update(self) -> None:
        stats = self.engine.stats
        for n in rows_since(stats, self.seen):
            self.rows.observe(n)
        self.seen = stats.steps
        self.resident.set(len(self.engine.resident))
        self.loads.set(stats.loads)


def _plain(headers: list) -> dict:
    return {k.decode(): v.decode() for k, v in headers if k.lower() not in (b"content-length", b"transfer-encoding")}


async def _rest(answer) -> AsyncIterator[bytes]:
    """The rest of a streamed answer; a replica lost part-way ends it with an error event, as the stream's own
    errors do."""
    try:
        async for _, chunk in answer:
            yield chunk
    except RayActorError:
        message = "The server replica handling your request stopped part-way; send the request again."
        yield sse(error_body(message, "server_error", code="replica_stopped")).encode()


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address`, or start a local Ray instance (once per process)."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": os.cpu_count() or 1}))


def start(options: ServerOptions, admin_key: str, *, replicas: int, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, threads: int | None = None, routed: bool = True) -> str:
    """Deploy the application (Ray started locally unless `address` names a cluster); returns its base URL."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    connect(address)
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(application(options, admin_key, replicas, threads, routed), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop(shutdown: bool = True) -> None:
    """Delete the application (its replicas finish what they hold first); with `shutdown`, stop Ray Serve too."""
    ray_serve.delete(APP_NAME)
    if shutdown:
        ray_serve.shutdown()


def serve(options: ServerOptions, admin_key: str, *, replicas: int, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None) -> None:
    """`slimtune serve --replicas N`: serve until interrupted (Ctrl-C or SIGTERM), then shut the replicas down."""

    def interrupt(*_):
        raise KeyboardInterrupt

    try:
        connect(address)
        signal.signal(signal.SIGTERM, interrupt)  # after Ray's start, which sets its own handler
        url = start(options, admin_key, replicas=replicas, host=host, port=port, address=address)
        log.info("serving %s with %d replicas on Ray Serve at %s", options.base_name, replicas, url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("shutting the replicas down")
    finally:
        if ray.is_initialized():
            with contextlib.suppress(Exception):  # interrupted before Serve started: nothing to stop
                stop()
