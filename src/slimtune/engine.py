"""Serving many users' tunings from one shared frozen model: the batched inference engine.

One worker thread owns the model. Requests from any thread or asyncio task are queued; between
two decoding steps the worker

1. answers waiting classification / scoring requests in one mixed batch,
2. admits waiting generation requests into the running batch (up to `max_batch` rows): their
   prompts are prefilled together into a fresh KV cache, which is then joined to the running
   batch's cache (left-padded to a common length),
3. runs one decoding step for every running row, each under its own tuning, samples each row's
   next token with its own settings and random generator, streams it, and drops rows that are
   done (iteration-level scheduling, as Orca and vLLM do).

Tunings are loaded from a `Store` on demand into a bank of at most `max_resident` users, and the
least recently used one not in the running batch is evicted to make room. A load is read in the background:
the batch steps on and other requests join it meanwhile; a request joins once its tuning is in. The store
may be shared with other processes: a tuning they replace or delete is noticed at its next request
(`serving.residency`).

Each row's result is what its tuning gives alone: rows never see each other (left padding is
masked, positions follow each row's own mask), and a row's sampling uses only its own seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import queue
import string
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from . import modules, storage
from .bank import Bank, read_tuning
from .data import Example, Task
from .data.errors import DataError
from .errors import RequestError, TuningError, UnknownUserError
from .formats import Format
from .methods import method_from_dict
from .serving.capture import CapturedStep
from .serving.fairness import OUTPUT_WEIGHT, FairShare
from .serving.kv import KEEP_IDLE_BYTES, SlotCache
from .serving.residency import Residency
from .serving.sampling import sample
from .serving.text import RowText
from .store import Store

# The limits of a request, here only: the server maps the errors to HTTP and checks nothing of its own.
MAX_TEMPERATURE = 2.0  # as OpenAI
MAX_STOP = 4  # stop strings, as OpenAI
MAX_STOP_CHARS = 256  # characters of one stop string
MAX_INPUTS = 256  # texts in one classification request
MAX_LABELS = 100  # labels of a classification task
MAX_SCORED_ROWS = 2048  # rows one classification request costs: texts (a head) or texts x labels (a verbalizer)
MAX_TEMPLATE_CHARS = 4000


class EngineClosedError(RuntimeError):
    """The engine is shutting down or closed and takes no new requests."""


@dataclass
class Completion:
    """A finished generation."""

    user: str | None
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of text or a stop string), "length" (max_new_tokens) or "cancelled"
    prompt_tokens: int
    logits: torch.Tensor | None = None  # [new tokens, vocab], when asked for with keep_logits=True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GenerationRequest:
    user: str | None
    prompt: str | list[int]
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 0: only the most likely token, i.e. greedy
    seed: int | None = None
    stop: Sequence[str] = ()
    keep_logits: bool = False
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    tenant: str | None = None  # whose share of the engine this uses (a server's key); None: the tuning's name

    @property
    def owner(self) -> str:
        """The tenant this request is scheduled as (see `fairness`)."""
        return _owner(self.tenant, self.user)

    def check(self) -> None:
        """Every setting within its limits (OpenAI's where it has them); a RequestError naming the first that is not."""
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}", "max_tokens")
        if not _number(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise RequestError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {self.temperature!r}",
                               "temperature")
        if not _number(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise RequestError(f"top_p must be between 0 and 1, got {self.top_p!r}", "top_p")
        if self.top_p == 0.0:  # only the most likely token is left
            self.temperature, self.top_p = 0.0, 1.0
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2**63) <= self.seed < 2**64):
            raise RequestError(f"seed must be an integer that fits in 64 bits, got {self.seed!r}", "seed")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if len(self.stop) > MAX_STOP or any(not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            shown = [s[:40] if isinstance(s, str) else s for s in self.stop[:MAX_STOP + 1]]
            raise RequestError(f"stop must be at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} "
                               f"characters, got {shown!r}", "stop")
        _check_tenant(self.tenant)


def _check_tenant(tenant: Any) -> None:
    if tenant is not None and (not isinstance(tenant, str) or len(tenant) > 200):
        raise RequestError(f"tenant must be a string of at most 200 characters or None, got {str(tenant)[:40]!r}")


def _owner(tenant: str | None, user: str | None) -> str:
    if tenant is not None:
        return "t:" + tenant
    return "" if user is None else "u:" + user


class _Channel:
    """Hands events from the worker thread to one consumer, blocking or asyncio."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        self.queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def put(self, item: tuple) -> None:
        if self.loop is None:
            self.queue.put(item)
        else:
            with contextlib.suppress(RuntimeError):  # the consumer's loop is gone: nobody is listening
                self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Generation:
    """A running generation: iterate it (sync or async) for text as it is made, or wait for the result."""

    def __init__(self, request: GenerationRequest, channel: _Channel):
        self.request = request
        self._channel = channel
        self._result: Completion | None = None
        self._error: BaseException | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step (a client that went away)."""
        self.cancelled = True

    def _event(self, item: tuple) -> str | None:
        kind, value = item
        if kind == "error":
            self._error = value
            raise value
        if kind == "done":
            self._result = value
            return None
        return value

    def __iter__(self) -> Iterator[str]:
        if self._channel.loop is not None:
            raise RuntimeError("this generation was started with the async API; use `async for`")
        while self._result is None:
            delta = self._event(self._channel.queue.get())
            if delta:
                yield delta

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._channel.loop is None:
            raise RuntimeError("this generation was started with the sync API; use `for`")
        try:
            while self._result is None:
                delta = self._event(await self._channel.queue.get())
                if delta:
                    yield delta
        except (asyncio.CancelledError, GeneratorExit):
            self.cancel()
            raise

    def result(self) -> Completion:
        for _ in self:
            pass
        if self._error is not None:
            raise self._error
        return self._result

    async def wait(self) -> Completion:
        async for _ in self:
            pass
        if self._error is not None:
            raise self._error
        return self._result


@dataclass
class _Row:
    """A generation in the running batch."""

    handle: Generation
    prompt_ids: list[int]
    generator: torch.Generator | None
    text: RowText
    sent: int = 0  # characters of text already streamed
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def tokens(self) -> list[int]:
        return self.text.tokens


@dataclass
class _Scoring:
    """One classification request, prepared off the worker: its rows (a text, or with a verbalizer a text
    followed by one label word), scored a batch at a time between decoding steps."""

    user: str
    format: Format
    texts: list[str]
    channel: _Channel
    rows: list[tuple[list[int], list[int]]]  # verbalizer: (prompt + label word ids, targets); a head: none
    owner: str = ""  # the tenant it is scheduled as
    scores: list[torch.Tensor] = field(default_factory=list)  # one per scored batch, in order
    next: int = 0  # rows (verbalizer) or texts (head) scored so far

    @property
    def head(self) -> bool:
        return self.format.style == "head"

    @property
    def size(self) -> int:
        return len(self.texts) if self.head else len(self.rows)

    def answer(self) -> list[dict[str, float]]:
        labels = self.format.task.labels
        scores = torch.cat(self.scores)
        probs = scores if self.head else scores.view(len(self.texts), len(labels)).softmax(-1)
        return [dict(zip(labels, p.tolist(), strict=True)) for p in probs]


class _Waiting:
    """Generations waiting to join the running batch: first come, first served within each tenant."""

    def __init__(self):
        self._by: dict[str, deque[tuple[Generation, list[int]]]] = {}

    def push(self, handle: Generation, ids: list[int]) -> None:
        self._by.setdefault(handle.request.owner, deque()).append((handle, ids))

    def tenants(self) -> list[str]:
        return list(self._by)

    def first(self, tenant: str) -> tuple[Generation, list[int]]:
        return self._by[tenant][0]

    def pop(self, tenant: str) -> tuple[Generation, list[int]]:
        line = self._by[tenant]
        item = line.popleft()
        if not line:
            del self._by[tenant]
        return item

    def clear(self) -> None:
        self._by.clear()

    def __bool__(self) -> bool:
        return bool(self._by)

    def __len__(self) -> int:
        return sum(map(len, self._by.values()))

    def __iter__(self) -> Iterator[tuple[Generation, list[int]]]:
        return itertools.chain.from_iterable(list(line) for line in self._by.values())


@dataclass
class EngineStats:
    requests: int = 0
    generated_tokens: int = 0
    steps: int = 0
    batch_rows: deque = field(default_factory=lambda: deque(maxlen=1000))  # rows per decoding step, recent
    loads: int = 0  # tunings put into the bank from the store
    evictions: int = 0
    loading: int = 0  # tunings being read from the store now, in the background (their requests wait, no others)
    load_seconds: float = 0.0  # time spent reading and checking tunings from the store, off the worker
    load_stall_seconds: float = 0.0  # time the worker spent putting loaded tunings into the bank: the batch waited
    cache_relayouts: int = 0  # times the batch's KV cache was copied into new buffers (it grows like an array)
    compiled_steps: int = 0  # decoding steps run by the compiled step (`compile=True`; the others ran eagerly)
    compiles: int = 0  # graphs the compiled step made (one per batch shape and slot-table layout)
    compile_seconds: float = 0.0  # time spent making them, in the background
    eager_steps_while_compiling: int = 0  # steps run eagerly while their batch shape's graph was compiling
    graph_breaks: int = 0  # in those graphs (0: each compiled step is one graph)
    memory: dict = field(default_factory=dict)  # Bank.memory() after the last step: the tunings' bytes, by part


class Engine:
    """Many users' tunings served from one frozen model, mixed row by row in each batch.

    `store`: where tunings are loaded from by name (users may also be added directly with `add`).
    `max_resident`: how many tunings the bank holds at once (least recently used ones are evicted).
    `max_batch`: rows per decoding step and per scoring batch.
    `compile`: run decoding steps through `torch.compile`, one graph per batch shape (`serving.capture`); on
    CUDA as CUDA graphs. Each shape's graph is compiled in the background, its steps running eagerly meanwhile:
    no row waits for a compile. True for inductor, or the name of another `torch.compile` backend ("aot_eager"
    captures the graph without generating code).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, store: Store | None = None, *, max_resident: int = 64,
                 max_batch: int = 32, max_length: int | None = None, compile: bool | str = False):
        if max_resident < 1 or max_batch < 1:
            raise TuningError("max_resident and max_batch must be at least 1")
        if isinstance(tokenizer, Store) or (store is not None and not isinstance(store, Store)):
            raise TuningError("Engine(model, tokenizer, store): pass the model's tokenizer second and the Store third")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.bank = Bank(model, tokenizer, frozen=True, serving=True, slots=max_resident)
        self.max_resident = max_resident
        self.max_batch = max_batch
        config = modules.text_config(model)
        self.max_length = max_length or getattr(config, "max_position_embeddings", None) or 2048
        self.can_generate = modules.is_causal_decoder(model)
        self.device = next(model.parameters()).device
        self.eos = self._eos_ids()
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sorted(self.eos) or [0])[0]
        # A prompt of more characters than this cannot fit the context (no token is longer): refused before tokenising.
        self.max_prompt_chars = self.max_length * _longest_token(tokenizer)
        self.stats = EngineStats()
        self._captured = None
        if compile:
            backend = "inductor" if compile is True else str(compile)
            mode = "reduce-overhead" if self.device.type == "cuda" and backend == "inductor" else None
            self._captured = CapturedStep(self.bank, self.pad, backend, mode, background=True,
                                          on_compile=self._count_compiled)
        self._tasks: dict[str, dict | None] = {}
        self._task_versions: dict[str, str | None] = {}  # the store's version each task was read from
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the bank against add/remove while the worker runs
        self._residency = Residency(self.bank, store, max_resident, self.stats, self._in_use,
                                    lambda user: self._tasks.pop(user, None),
                                    lambda: self._inbox.put(("wake", None, None)), guard=self._lock)
        self._waiting = _Waiting()
        self._scoring: deque[_Scoring] = deque()
        self._fair = FairShare()  # who is owed the next turn: see `fairness`
        self._running: list[_Row] = []
        self._cache: SlotCache | None = None
        self._relayouts = 0  # of caches gone before this one
        self._mask: torch.Tensor | None = None
        self._starting = threading.Lock()
        self._closing = False
        self._worker: threading.Thread | None = None

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
        return ids

    # --- tunings -------------------------------------------------------------------------------

    def add(self, name: str, tuning: Any, task: dict | None = None) -> None:
        """Serve `tuning` (a method config, saved folder or TunedModel) as `name`, resident until removed."""
        with self._lock:
            self.bank.add(name, tuning)
            self._residency.pin(name)
        self._tasks[name] = task if task is not None else _task_of(tuning)

    def remove(self, name: str) -> None:
        """Forget a tuning (deleted or replaced in the store, or added directly): requests already
        running keep the old one until they end; later ones get what the store holds then."""
        with self._lock:
            self._tasks.pop(name, None)
            self._residency.forget(name)

    @property
    def resident(self) -> list[str]:
        return self._residency.names

    def memory(self) -> dict[str, int]:
        """Bytes the resident tunings take beside the model (see `Bank.memory`) as of the last decoding step:
        bounded by the slots of `max_resident` tunings and one batch layout, whatever the batches served."""
        return dict(self.stats.memory)

    def knows(self, user: str | None) -> bool:
        if user is None or user in self._residency.pinned:
            return True
        return self.store is not None and user in self.store

    def task(self, user: str) -> dict | None:
        """What `user`'s tuning was trained to do (labels, template), if recorded."""
        self._check_user(user)
        version = None if user in self._residency.pinned else self.store.version(user)
        if user not in self._tasks or self._task_versions.get(user) != version:  # replaced, maybe by another process
            self._tasks[user] = self.store.entry(user).task
            self._task_versions[user] = version
        return self._tasks[user]

    def check(self, tuning: str | os.PathLike, task: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """Load a saved tuning as serving it would, on this engine's model, then let it go again: the
        whole check of an upload before it is stored. Returns what a store should keep (the record,
        its method's module patterns resolved into module names, the task: `task`, else the one the
        tuning records, checked; and the tensors). Raises a `TuningError` saying what does not fit
        (a `RequestError` for the task); the model and the tunings being served are unchanged."""
        task = task if task is not None else _task_of(tuning)
        if task is not None:
            self.check_task(task)
        method, state = read_tuning(tuning, self.model, self.bank.fingerprint)
        self.bank.check_method(method)  # before anything is built: a full fine-tune is refused here
        method = method.resolve(self.model)
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                raise TuningError(f"tensor {name!r} holds {tensor.dtype} values; a tuning's tensors are floating point")
            if not torch.isfinite(tensor).all():
                raise TuningError(f"tensor {name!r} holds values that are not finite numbers (NaN or infinity)")
        self.bank.check(method, state, guard=self._lock)  # built off the worker's lock: it serves on meanwhile
        record = {"method": method.to_dict(), "model": self.bank.fingerprint}
        return (record if task is None else {**record, "task": task}), state

    def check_task(self, task: Any) -> dict:
        """A task record (what a tuning was trained to do) checked to be one this engine can serve, within
        the limits; returns it. Raises a RequestError (param "task") saying what is wrong."""
        self._format_of(task)
        return task

    def _format_of(self, task: Any) -> Format:
        def wrong(message: str) -> RequestError:
            return RequestError(f"task: {message}", "task")

        if not isinstance(task, dict):
            raise wrong(f"expected a JSON object, got {type(task).__name__}")
        kind = task.get("kind", "classification")
        if kind not in ("classification", "generation"):
            raise wrong(f"kind must be 'classification' or 'generation', got {str(kind)[:40]!r}")
        name = task.get("name", "task")
        if not isinstance(name, str) or len(name) > 200:
            raise wrong("name must be a string of at most 200 characters")
        template = task.get("template") or ""
        if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
            raise wrong(f"template must be a string of at most {MAX_TEMPLATE_CHARS} characters")
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
        except ValueError as err:
            raise wrong(f"template is not a valid format string ({err})") from None
        if any(f not in ("text", "text_pair") or spec or conv for f, spec, conv in fields):
            raise wrong("template may hold only the fields {text} and {text_pair}, with no format spec or conversion")
        max_length = task.get("max_length", 128)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= self.max_length:
            raise wrong(f"max_length must be an integer from 1 to the model's context of {self.max_length} tokens")
        if kind == "generation":
            return Format(Task(name=name, kind="generation", train=[], validation=[], test=[]), self.tokenizer,
                          "generation", max_length=max_length, template=template)
        labels, words = task.get("labels"), task.get("label_words")
        if (not isinstance(labels, list) or not 1 <= len(labels) <= MAX_LABELS or len(set(map(str, labels))) != len(labels)
                or any(not isinstance(x, str) or not x or len(x) > 200 for x in labels)):
            raise wrong(f"labels must be a list of 1 to {MAX_LABELS} different non-empty strings of at most 200 characters")
        if words is not None and (not isinstance(words, dict) or set(words) != set(labels)
                                  or any(not isinstance(w, str) or not w or len(w) > 200 for w in words.values())):
            raise wrong("label_words must map each label (and nothing else) to a non-empty word of at most 200 characters")
        head = bool(modules.head_names(self.model))
        style = task.get("style") or ("head" if head else "verbalizer")
        if style != ("head" if head else "verbalizer"):
            raise wrong(f"style must be {'head' if head else 'verbalizer'} for {type(self.model).__name__}, "
                        f"got {str(style)[:40]!r}")
        if head and len(labels) != getattr(modules.text_config(self.model), "num_labels", len(labels)):
            raise wrong(f"the model's head has {modules.text_config(self.model).num_labels} labels, the task {len(labels)}")
        try:
            spec = Task(name=name, kind="classification", train=[], validation=[], test=[], labels=labels,
                        label_words=words)
            fmt = Format(spec, self.tokenizer, style, max_length=max_length, template=template)
        except (DataError, TuningError) as err:
            raise wrong(str(err)) from None
        if not head and max(len(ids) for ids in fmt.label_ids) >= max_length:
            raise wrong(f"a label word is as long as max_length ({max_length} tokens) or longer")
        return fmt

    def _check_user(self, user: str | None) -> None:
        if user is not None and not isinstance(user, str):
            raise RequestError(f"a user must be a tuning name or None (the base model), got {user!r}")
        if not self.knows(user):
            raise UnknownUserError(f"unknown tuning {user!r}")

    def _in_use(self, name: str) -> bool:
        return any(row.request.user == name for row in self._running)

    def _make_resident(self, user: str | None, keep: set[str]) -> bool:
        return self._residency.ensure(user, keep)

    # --- the public API ------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> Generation:
        """Queue a generation; returns its handle at once (errors in the request are raised here)."""
        if self._closing:
            raise EngineClosedError("the engine is shutting down and takes no new requests")
        if not self.can_generate:
            raise RequestError(f"generation needs a decoder-only language model; this is {type(self.model).__name__}")
        request.check()
        self._check_user(request.user)
        ids = list(request.prompt) if not isinstance(request.prompt, str) else self.tokenizer(request.prompt)["input_ids"]
        if not ids:
            raise RequestError("the prompt is empty: give at least one token")
        if any(not isinstance(t, int) or not 0 <= t < len(self.tokenizer) for t in ids):
            raise RequestError("the prompt's token ids must be integers within the vocabulary")
        virtual = self.virtual_tokens(request.user)
        if len(ids) + virtual + request.max_new_tokens > self.max_length:
            raise RequestError(
                f"the prompt has {len(ids)} tokens{f' (+{virtual} virtual)' if virtual else ''} and asks for "
                f"{request.max_new_tokens} new ones, more than the model's context of {self.max_length} tokens"
            )
        handle = Generation(request, _Channel(loop))
        self.stats.requests += 1
        self._inbox.put(("generate", handle, ids))
        self._ensure_worker()
        return handle

    def generate(self, user: str | None, prompt: str | list[int], **options) -> Completion:
        """Generate for one user and wait for it (sync API)."""
        return self.submit(GenerationRequest(user, prompt, **options)).result()

    def stream(self, user: str | None, prompt: str | list[int], **options) -> Generation:
        """Generate for one user; iterate the result for the text as it comes (sync API)."""
        return self.submit(GenerationRequest(user, prompt, **options))

    async def agenerate(self, user: str | None, prompt: str | list[int], **options) -> Completion:
        return await self.astream(user, prompt, **options).wait()

    def astream(self, user: str | None, prompt: str | list[int], **options) -> Generation:
        """Generate for one user; `async for delta in engine.astream(...)` streams the text."""
        return self.submit(GenerationRequest(user, prompt, **options), loop=asyncio.get_running_loop())

    def classify(self, user: str | None, texts: Sequence[str], tenant: str | None = None) -> list[dict[str, float]]:
        """Label probabilities for each text under `user`'s classification tuning (sync API); `tenant` as in
        `GenerationRequest`."""
        job = self._scoring_job(user, texts, tenant, None)
        self._submit_scoring(job)
        return _unwrap(job.channel.queue.get())

    async def aclassify(self, user: str | None, texts: Sequence[str], tenant: str | None = None) -> list[dict[str, float]]:
        """As `classify`; the texts are tokenised in a thread, off the event loop and off the worker."""
        job = await asyncio.to_thread(self._scoring_job, user, texts, tenant, asyncio.get_running_loop())
        self._submit_scoring(job)
        return _unwrap(await job.channel.queue.get())

    def _scoring_job(self, user: str | None, texts: Sequence[str], tenant: str | None, loop) -> _Scoring:
        """A classification request checked against the limits and tokenised, ready for the worker."""
        if self._closing:
            raise EngineClosedError("the engine is shutting down and takes no new requests")
        _check_tenant(tenant)
        self._check_user(user)
        if isinstance(texts, str) or not texts or any(not isinstance(t, str) for t in texts):
            raise RequestError("inputs must be a non-empty list of strings", "inputs")
        if len(texts) > MAX_INPUTS:
            raise RequestError(f"inputs holds {len(texts)} texts; at most {MAX_INPUTS} per request", "inputs")
        if any(len(t) > self.max_prompt_chars for t in texts):
            raise RequestError(f"an input is longer than {self.max_prompt_chars} characters, more than the model's "
                               f"context of {self.max_length} tokens could hold", "inputs")
        task = self.task(user) if user is not None else None
        if not task or task.get("kind") != "classification":
            raise RequestError(f"{user!r} is not a classification tuning (no labels recorded with it)", "model")
        fmt = self._format_of(task)
        cost = len(texts) * (1 if fmt.style == "head" else len(fmt.label_ids))
        if cost > MAX_SCORED_ROWS:
            raise RequestError(f"{len(texts)} inputs x {len(fmt.label_ids)} labels is {cost} rows to score; at most "
                               f"{MAX_SCORED_ROWS} per request: send fewer inputs at a time", "inputs")
        rows = []
        if fmt.style != "head":
            room = max(len(ids) for ids in fmt.label_ids)
            for text in texts:
                prompt = fmt.prompt_ids(Example(text=text), room=room)
                rows.extend((prompt + ids, [-100] * len(prompt) + ids) for ids in fmt.label_ids)
        return _Scoring(user, fmt, list(texts), _Channel(loop), rows, _owner(tenant, user))

    def _submit_scoring(self, job: _Scoring) -> None:
        if self._closing:
            raise EngineClosedError("the engine is shutting down and takes no new requests")
        self.stats.requests += 1
        self._inbox.put(("score", job, None))
        self._ensure_worker()

    def close(self, wait: bool = True) -> None:
        """Stop taking requests; with `wait`, finish the ones in flight, else cancel them."""
        self._closing = True
        if not wait:
            for row in self._running:
                row.handle.cancel()
            for handle, _ in self._waiting:
                handle.cancel()
        self._inbox.put(("wake", None, None))
        if self._worker is not None:
            self._worker.join()
        self._residency.close()  # after the worker: with `wait`, requests still waiting for a load were served
        if self._captured is not None:
            self._captured.close(wait)  # what is queued is dropped; with `wait`, the running compile ends first
        self.bank.detach()  # the model is the caller's: it leaves as it came, with none of the bank's hooks

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the worker ----------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        with self._starting:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="slimtune-engine", daemon=True)
                self._worker.start()

    def virtual_tokens(self, user: str | None) -> int:
        """The prompt-tuning tokens a user's rows carry (they count against the context)."""
        if user is None:
            return 0
        method = None
        if user in self.bank.users and self._residency.current(user):
            with contextlib.suppress(UnknownUserError):  # evicted by the worker since the check
                method = self.bank.method(user)
        if method is None and self.store is not None and user in self.store:
            with contextlib.suppress(UnknownUserError):  # deleted since the check: its request fails at admission
                method = method_from_dict(self.store.entry(user).method)
        return method.virtual_tokens if method is not None else 0

    def _work(self) -> None:
        try:
            stuck = False  # the last round moved nothing: what waits, waits for a load (or a new request)
            while True:
                busy = bool(self._running or self._waiting or self._scoring)
                if not busy and self._closing and self._inbox.empty():
                    return
                self._take(block=not busy or stuck)  # a load that ends wakes it (`Residency.on_loaded`)
                try:
                    with torch.inference_mode(), self._lock:
                        moved = self._score()
                        moved = self._admit() or moved
                        if self._running:
                            self._step()
                        self.stats.memory = self.bank.memory()
                    stuck = not (moved or self._running)
                except Exception as err:  # a fault of the engine's own: each request's errors are caught nearer
                    self._fail_all(err)
                    stuck = False
        finally:  # even a BaseException: no request is left waiting for an answer that cannot come
            self._fail_all(EngineClosedError("the engine stopped"))

    def _take(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        active: set[str] | None = None  # the tenants with work in the engine
        while True:
            kind, job, ids = item
            if kind in ("generate", "score"):
                owner = job.request.owner if kind == "generate" else job.owner
                if active is None:
                    active = self._tenants()
                if owner not in active:
                    self._fair.arrive(owner, active)
                    active.add(owner)
                if kind == "generate":
                    self._waiting.push(job, ids)
                else:
                    self._scoring.append(job)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _tenants(self) -> set[str]:
        return ({row.request.owner for row in self._running} | set(self._waiting.tenants())
                | {job.owner for job in self._scoring})

    def _fail_all(self, err: BaseException) -> None:
        for row in self._running:
            row.handle._channel.put(("error", err))
        for handle, _ in self._waiting:
            handle._channel.put(("error", err))
        for job in self._scoring:
            job.channel.put(("error", err))
        self._running, self._cache, self._mask = [], None, None
        self._waiting.clear()
        self._scoring.clear()

    # scoring

    def _score(self) -> None:
        """Score one batch of at most `max_batch` waiting classification rows, of one or several requests
        (a long request goes on at the next step: generation is not held up behind it), when it is their
        tenants' turn: no tenant with generations waiting or running has had less service (`fairness`).
        A batch that fails is run again request by request, so an error fails only the request it came from.
        Returns whether a request was scored or failed."""
        if not self._scoring:
            return False
        generating = {row.request.owner for row in self._running} | set(self._waiting.tenants())
        least = self._fair.least(generating)
        jobs = sorted(self._scoring, key=lambda job: self._fair.served(job.owner))  # stable: in arrival order per tenant
        if least is not None and self._fair.served(jobs[0].owner) > least:
            return False
        batch: list[tuple[_Scoring, int, int]] = []  # (request, first row, end)
        rows, keep, held, failed = 0, set(), set(), False
        for job in jobs:
            if job.owner in held:
                continue  # a tenant's requests are scored in the order they came
            if rows >= self.max_batch or (batch and (job.head or batch[0][0].head)):
                break  # a head's inputs are its format's to tokenise: it runs alone
            try:
                resident = self._make_resident(job.user, keep)
            except Exception as err:  # deleted meanwhile, or unreadable: this request fails, no other
                self._scoring.remove(job)
                job.channel.put(("error", err))
                failed = True
                continue
            if not resident:
                held.add(job.owner)  # its tuning is loading (or the bank is full of tunings in use): others go on
                continue
            take = min(job.size - job.next, self.max_batch - rows)
            batch.append((job, job.next, job.next + take))
            rows += take
            keep.add(job.user)
        if not batch:
            return failed
        try:
            results: list = self._score_rows(batch)
        except Exception as err:
            results = [err] if len(batch) == 1 else [self._score_alone(part) for part in batch]
        for (job, _, end), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                self._scoring.remove(job)
                job.channel.put(("error", result))
                continue
            scores, tokens = result
            self._fair.charge(job.owner, tokens)
            job.scores.append(scores)
            job.next = end
            if job.next >= job.size:
                self._scoring.remove(job)
                job.channel.put(("done", job.answer()))
        return True

    def _score_alone(self, part: tuple[_Scoring, int, int]) -> tuple[torch.Tensor, int] | Exception:
        try:
            return self._score_rows([part])[0]
        except Exception as err:
            return err

    def _score_rows(self, batch: list[tuple[_Scoring, int, int]]) -> list[tuple[torch.Tensor, int]]:
        """Each part's scores and tokens: a head's class probabilities per text, or per (text, label word) row
        the label word's summed log-probability (normalised over the labels once the request is whole)."""
        if batch[0][0].head:
            job, start, end = batch[0]
            inputs = job.format.head_inputs([Example(text=t) for t in job.texts[start:end]], self.device)
            probs = self.bank(users=[job.user] * (end - start), **inputs).logits.float().softmax(-1)
            return [(probs, int(inputs["attention_mask"].sum()))]
        rows = [row for job, start, end in batch for row in job.rows[start:end]]
        users = [job.user for job, start, end in batch for _ in range(end - start)]
        padded = batch[0][0].format._pad([r[0] for r in rows], [r[1] for r in rows], self.device)
        logits = self.bank(users=users, input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        labels = padded["labels"][:, 1:]
        scores = (logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)).sum(-1)
        parts = scores.split([end - start for _, start, end in batch])
        return [(part, sum(len(r[0]) for r in job.rows[start:end])) for part, (job, start, end) in zip(parts, batch, strict=True)]

    # generation

    def _admit(self) -> bool:
        """Move waiting generations into the running batch while it has room, the least served tenant's
        first (`fairness`), each tenant's in the order they came; a tenant whose next request's tuning is not in
        the bank yet (loading) waits, the others go on. Returns whether a request left the waiting line."""
        new: list[_Row] = []
        keep = {row.request.user for row in self._running if row.request.user is not None}
        blocked: set[str] = set()  # tenants whose next request's tuning is loading, or cannot be until rows finish
        moved = False
        while len(self._running) + len(new) < self.max_batch:
            tenant = next((t for t in self._fair.order(self._waiting.tenants()) if t not in blocked), None)
            if tenant is None:
                break
            handle, ids = self._waiting.first(tenant)
            if handle.cancelled:
                self._waiting.pop(tenant)
                self._finish(_Row(handle, ids, None, RowText(self.tokenizer)), "cancelled")
                moved = True
                continue
            try:
                resident = self._make_resident(handle.request.user, keep)
            except Exception as err:  # deleted meanwhile, or unreadable: this request fails, no other
                self._waiting.pop(tenant)
                handle._channel.put(("error", err))
                moved = True
                continue
            if not resident:
                blocked.add(tenant)  # loading in the background, or the bank is full of tunings in use
                continue
            self._waiting.pop(tenant)
            self._fair.charge(tenant, len(ids))
            keep.add(handle.request.user)
            seed = handle.request.seed
            generator = None
            if handle.request.temperature > 0:
                generator = torch.Generator()  # on the host: a row's samples depend on its seed alone
                generator.manual_seed(seed if seed is not None else int(time.time_ns() % (2**63)))
            new.append(_Row(handle, ids, generator, RowText(self.tokenizer, handle.request.stop)))
        if not new:
            return moved
        try:
            self._prefill(new)
        except Exception as err:  # one of them cannot run: find which, alone; the others join as usual
            if len(new) == 1:
                self._fail_rows(new, err)
                return True
            for row in new:
                try:
                    self._prefill([row])
                except Exception as alone:
                    self._fail_rows([row], alone)
        return True

    def _prefill(self, new: list[_Row]) -> None:
        """Prefill new rows' prompts into a fresh cache and join them to the running batch."""
        width = max(len(r.prompt_ids) for r in new)
        ids = torch.full((len(new), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(new), width, dtype=torch.long)
        for b, row in enumerate(new):
            ids[b, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[b, width - len(row.prompt_ids):] = 1
        # Whole layers, sliding-window ones too (not trimmed to the window, as DynamicCache(config) would): joining and
        # trimming keep each row's columns contiguous, so the masks' windows, counted in columns, stay right.
        cache = DynamicCache()
        logits, mask = self.bank.prefill(ids.to(self.device), mask.to(self.device), [r.request.user for r in new], cache)
        self._join(new, cache, mask)
        self._advance(new, logits, first=len(self._running) - len(new))

    def _fail_rows(self, rows: list[_Row], err: BaseException) -> None:
        for row in rows:
            row.handle._channel.put(("error", err))

    def _step(self) -> None:
        last = torch.tensor([[row.tokens[-1]] for row in self._running], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._running), 1)], dim=1)
        mark = self._cache.reserve(1)
        users = [r.request.user for r in self._running]
        try:
            logits = None
            if self._captured is not None:
                logits = self._captured.step(last, mask, users, self._cache)
                self._count_compiled()
            if logits is None:
                logits = self.bank.decode(last, mask, users, self._cache)
        except Exception as err:
            self._cache.rewind(mark)
            self._drop_failing(err, mask)
            return
        self._mask = mask
        self.stats.steps += 1
        self.stats.batch_rows.append(len(self._running))
        self._advance(self._running, logits, first=0)

    def _count_compiled(self) -> None:
        self.stats.compiled_steps = self._captured.steps
        self.stats.eager_steps_while_compiling = self._captured.eager_steps
        self.stats.compiles = self._captured.compiles
        self.stats.compile_seconds = self._captured.compile_seconds
        self.stats.graph_breaks = self._captured.graph_breaks

    def _drop_failing(self, err: Exception, mask: torch.Tensor) -> None:
        """A decoding step (over `mask`) failed: run each tuning's rows alone (on a copy of their cache) to find
        the ones that fail, and fail only those; the others take the step again next time. If none fails alone,
        the fault is not one request's: every running row fails."""
        failing: set[int] = set()
        for user in dict.fromkeys(r.request.user for r in self._running):
            rows = [i for i, r in enumerate(self._running) if r.request.user == user]
            index = torch.tensor(rows, device=self.device)
            alone = DynamicCache()
            for i, layer in enumerate(self._cache.layers):
                alone.update(layer.keys.index_select(0, index), layer.values.index_select(0, index), i)
            last = torch.tensor([[self._running[i].tokens[-1]] for i in rows], device=self.device)
            try:
                self.bank.decode(last, mask.index_select(0, index), [user] * len(rows), alone)
            except Exception as own:
                self._fail_rows([self._running[i] for i in rows], own)
                failing.update(rows)
        if not failing:
            raise err
        self._keep([i for i in range(len(self._running)) if i not in failing])

    def _advance(self, rows: list[_Row], logits: torch.Tensor, first: int) -> None:
        """Sample each row's next token from its logits, stream it, and drop the rows that are done. A row
        whose sampling or text fails is failed alone."""
        greedy = logits.argmax(-1).tolist()
        done = []
        for i, row in enumerate(rows):
            self._fair.charge(row.request.owner, 1, OUTPUT_WEIGHT)
            try:
                request = row.request
                token = (greedy[i] if request.temperature <= 0
                         else sample(logits[i], request.temperature, request.top_p, row.generator))
                if request.keep_logits:
                    row.logits.append(logits[i].float().cpu())
                reason = self._push(row, token)
            except Exception as err:
                self._fail_rows([row], err)
                reason = "failed"
            if reason is not None:
                done.append((first + i, row, reason))
        if done:
            gone = {i for i, _, _ in done}
            for _, row, reason in done:
                if reason != "failed":
                    self._finish(row, reason)
            self._keep([i for i in range(len(self._running)) if i not in gone])

    def _push(self, row: _Row, token: int) -> str | None:
        """Add a token to a row; the reason it is finished, if it is."""
        self.stats.generated_tokens += 1
        if row.handle.cancelled:
            return "cancelled"
        if token in self.eos and not row.request.ignore_eos:
            return "stop"
        if row.text.add(token):  # only what is new is decoded and searched for stop strings
            return "stop"
        if len(row.tokens) >= row.request.max_new_tokens:
            return "length"
        ready = row.text.ready()  # less what could still turn into a stop string
        if ready > row.sent:
            row.handle._channel.put(("delta", row.text.text[row.sent:ready]))
            row.sent = ready
        return None

    def _finish(self, row: _Row, reason: str) -> None:
        text = row.text.final()
        if len(text) > row.sent:
            row.handle._channel.put(("delta", text[row.sent:]))
        logits = torch.stack(row.logits) if row.logits else None
        completion = Completion(row.request.user, text, list(row.tokens), reason, len(row.prompt_ids), logits)
        row.handle._channel.put(("done", completion))

    # the running batch's cache

    def _join(self, new: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running batch: their keys and values go into their own slots of
        the batch's cache (`serving.kv`), right-aligned with the others; the masks are left-padded to its width."""
        if self._cache is None:
            self._cache = SlotCache(cache, self.max_batch)
            self._running, self._mask = list(new), mask
        elif not self._running:  # the buffers kept from the last batch
            self._cache.join(cache)
            self._running, self._mask = list(new), mask
        else:
            self._cache.join(cache)
            width = self._cache.width
            self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)])
            self._running = self._running + list(new)
        self.stats.cache_relayouts = self._relayouts + self._cache.relayouts

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows of the running batch (their slots: the batch's last rows move into the freed
        ones), and drop from the window the cache columns no remaining row sees."""
        order = self._cache.keep(rows)
        if not rows:
            self._running, self._mask = [], None
            if self._cache.bytes() > KEEP_IDLE_BYTES:  # too big to hold while idle
                self._relayouts += self._cache.relayouts
                self._cache = None
            return
        self._running = [self._running[i] for i in order]
        mask = self._mask.index_select(0, torch.tensor(order, device=self._mask.device))
        seen = mask.any(0).nonzero()
        start = int(seen[0]) if len(seen) else 0
        if start:
            self._cache.trim_left(start)
        self._mask = mask[:, start:]


def _pad_left(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    extra = width - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _longest_token(tokenizer: Any) -> int:
    """Characters of the tokenizer's longest token (at least 1)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max((len(token) for token in vocab), default=16) or 1


def _unwrap(item: tuple):
    kind, value = item
    if kind == "error":
        raise value
    return value


def _task_of(tuning: Any) -> dict | None:
    """The task recorded in a saved slimtune tuning folder, if any (a PEFT folder records none)."""
    if isinstance(tuning, (str, os.PathLike)) and (Path(tuning) / storage.RECORD).is_file():
        return storage.read_record(tuning).get("task")
    return None
