"""The server's Prometheus metrics: HTTP requests and their latency, and the engine's figures as of each scrape."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter

from ...engine import Engine


def rows_since(stats, seen: int) -> list[int]:
    """Rows of each decoding step after the first `seen` steps (of the recent ones: the engine keeps the last 1000)."""
    rows = list(stats.batch_rows)
    new = min(stats.steps - seen, len(rows))
    return rows[len(rows) - new:] if new > 0 else []


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
        for n in rows_since(stats, self._seen_steps):
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


class Observe:
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
