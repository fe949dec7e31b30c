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
least recently used one not in the running batch is evicted to make room.

Each row's result is what its tuning gives alone: rows never see each other (left padding is
masked, positions follow each row's own mask), and a row's sampling uses only its own seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from . import modules, storage
from .bank import Bank
from .data import Example, Task
from .errors import TuningError, UnknownUserError
from .formats import Format
from .store import Store


class RequestError(TuningError):
    """A request the engine cannot serve as asked (bad setting, prompt too long, wrong kind of tuning)."""


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


@dataclass
class GenerationRequest:
    user: str | None
    prompt: str | list[int]
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    keep_logits: bool = False
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 10.0:
            raise RequestError(f"temperature must be a number in [0, 10], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop must be a list of non-empty strings, got {self.stop!r}")


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
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already streamed
    logits: list[torch.Tensor] = field(default_factory=list)
    final_text: str | None = None  # set when a stop string cut the text

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


@dataclass
class _Scoring:
    user: str | None
    texts: list[str]
    channel: _Channel


@dataclass
class EngineStats:
    requests: int = 0
    generated_tokens: int = 0
    steps: int = 0
    batch_rows: deque = field(default_factory=lambda: deque(maxlen=1000))  # rows per decoding step, recent
    loads: int = 0
    evictions: int = 0


class Engine:
    """Many users' tunings served from one frozen model, mixed row by row in each batch.

    `store`: where tunings are loaded from by name (users may also be added directly with `add`).
    `max_resident`: how many tunings the bank holds at once (least recently used ones are evicted).
    `max_batch`: rows per decoding step and per scoring batch.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, store: Store | None = None, *, max_resident: int = 64,
                 max_batch: int = 32, max_length: int | None = None):
        if max_resident < 1 or max_batch < 1:
            raise TuningError("max_resident and max_batch must be at least 1")
        if isinstance(tokenizer, Store) or (store is not None and not isinstance(store, Store)):
            raise TuningError("Engine(model, tokenizer, store): pass the model's tokenizer second and the Store third")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.bank = Bank(model, tokenizer)
        self.max_resident = max_resident
        self.max_batch = max_batch
        config = modules.text_config(model)
        self.max_length = max_length or getattr(config, "max_position_embeddings", None) or 2048
        self.can_generate = modules.is_causal_decoder(model)
        self.device = next(model.parameters()).device
        self.eos = self._eos_ids()
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sorted(self.eos) or [0])[0]
        self.stats = EngineStats()
        self._resident: OrderedDict[str, None] = OrderedDict()  # loaded from the store, least recent first
        self._pinned: set[str] = set()  # added directly: cannot be reloaded, never evicted
        self._stale: set[str] = set()  # deleted or replaced in the store while rows still used them
        self._tasks: dict[str, dict | None] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[tuple[Generation, list[int]]] = deque()
        self._scoring: deque[_Scoring] = deque()
        self._running: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._lock = threading.Lock()  # guards the bank against add/remove while the worker runs
        self._starting = threading.Lock()
        self._closing = False
        self._worker: threading.Thread | None = None
        self._ids = itertools.count()

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
        self._pinned.add(name)
        self._tasks[name] = task if task is not None else _task_of(tuning)

    def remove(self, name: str) -> None:
        """Forget a tuning (deleted or replaced in the store, or added directly): requests already
        running keep the old one until they end; later ones get what the store holds then."""
        with self._lock:
            self._tasks.pop(name, None)
            if name in self._pinned:
                self._pinned.discard(name)
                self._resident[name] = None  # evicted like a stored one once its rows are done
            if name in self._resident:
                if self._in_use(name):
                    self._stale.add(name)
                else:
                    self._evict(name)

    @property
    def resident(self) -> list[str]:
        return [*self._pinned, *(u for u in self._resident if u not in self._pinned)]

    def knows(self, user: str | None) -> bool:
        if user is None or user in self._pinned:
            return True
        return self.store is not None and user in self.store

    def task(self, user: str) -> dict | None:
        """What `user`'s tuning was trained to do (labels, template), if recorded."""
        self._check_user(user)
        if user not in self._tasks:
            self._tasks[user] = self.store.entry(user).task
        return self._tasks[user]

    def _check_user(self, user: str | None) -> None:
        if user is not None and not isinstance(user, str):
            raise RequestError(f"a user must be a tuning name or None (the base model), got {user!r}")
        if not self.knows(user):
            raise UnknownUserError(f"unknown tuning {user!r}")

    def _in_use(self, name: str) -> bool:
        return any(row.request.user == name for row in self._running)

    def _make_resident(self, user: str | None, keep: set[str]) -> bool:
        """Load `user` if needed; False when the bank is full of tunings in use (try again later)."""
        if user is None or user in self._pinned:
            return True
        if user in self._stale and not self._in_use(user):
            self._evict(user)
        if user in self._resident and user not in self._stale:
            self._resident.move_to_end(user)
            return True
        if user in self._stale:
            return False  # the old version is still in use: wait for its rows to finish
        if len(self._resident) >= self.max_resident:
            victim = next((u for u in self._resident if u not in keep and not self._in_use(u)), None)
            if victim is None:
                return False
            self._evict(victim)
        with torch.inference_mode(False):  # ordinary tensors: usable outside inference too
            self.bank.add(user, self.store.path_of(user))
        self._resident[user] = None
        self.stats.loads += 1
        return True

    def _evict(self, user: str) -> None:
        self.bank.remove(user)
        self._resident.pop(user, None)
        self._tasks.pop(user, None)
        self._stale.discard(user)
        self.stats.evictions += 1

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

    def classify(self, user: str | None, texts: Sequence[str]) -> list[dict[str, float]]:
        """Label probabilities for each text under `user`'s classification tuning (sync API)."""
        channel = self._submit_scoring(user, texts, None)
        return _unwrap(channel.queue.get())

    async def aclassify(self, user: str | None, texts: Sequence[str]) -> list[dict[str, float]]:
        channel = self._submit_scoring(user, texts, asyncio.get_running_loop())
        return _unwrap(await channel.queue.get())

    def _submit_scoring(self, user, texts, loop) -> _Channel:
        if self._closing:
            raise EngineClosedError("the engine is shutting down and takes no new requests")
        self._check_user(user)
        if isinstance(texts, str) or not texts or any(not isinstance(t, str) for t in texts):
            raise RequestError("inputs must be a non-empty list of strings")
        task = self.task(user) if user is not None else None
        if not task or task.get("kind") != "classification":
            raise RequestError(f"{user!r} is not a classification tuning (no labels recorded with it)")
        channel = _Channel(loop)
        self.stats.requests += 1
        self._inbox.put(("score", _Scoring(user, list(texts), channel), None))
        self._ensure_worker()
        return channel

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
        if user in self.bank.users:
            method = self.bank.method(user).to_dict()
        elif self.store is not None and user in self.store:
            method = self.store.entry(user).method
        else:
            return 0
        return int(method.get("length", 0)) if method.get("kind") == "prompt" else 0

    def _work(self) -> None:
        while True:
            busy = bool(self._running or self._waiting or self._scoring)
            if not busy and self._closing and self._inbox.empty():
                return
            self._take(block=not busy)
            try:
                with torch.inference_mode(), self._lock:
                    self._score()
                    self._admit()
                    if self._running:
                        self._step()
            except Exception as err:  # fail the requests in flight, keep serving
                self._fail_all(err)

    def _take(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, job, ids = item
            if kind == "generate":
                self._waiting.append((job, ids))
            elif kind == "score":
                self._scoring.append(job)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _fail_all(self, err: Exception) -> None:
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
        while self._scoring:
            jobs, rows = [], 0
            while self._scoring and (not jobs or rows + len(self._scoring[0].texts) <= self.max_batch):
                job = self._scoring[0]
                keep = {j.user for j in jobs if j.user is not None}
                try:
                    resident = self._make_resident(job.user, keep)
                except Exception as err:  # deleted meanwhile, or unreadable: this request fails, no other
                    self._scoring.popleft().channel.put(("error", err))
                    continue
                if not resident:
                    break
                jobs.append(self._scoring.popleft())
                rows += len(job.texts)
            if not jobs:
                return
            try:
                for job, answer in zip(jobs, self._classify(jobs), strict=True):
                    job.channel.put(("done", answer))
            except Exception as err:
                for job in jobs:
                    job.channel.put(("error", err))

    def _classify(self, jobs: list[_Scoring]) -> list[list[dict[str, float]]]:
        """Every job's texts in one batch: a head's class probabilities, or for a verbalizer the
        probability of each label word (its tokens' summed log-probability, normalised over the labels)."""
        formats = {j.user: self._format(j.user) for j in jobs}
        heads = [j for j in jobs if formats[j.user].style == "head"]
        words = [j for j in jobs if formats[j.user].style != "head"]
        answers: dict[int, list[dict[str, float]]] = {}
        if heads:
            # One batch per task format: tokenisation (pairs, lengths) is the format's.
            for job in heads:
                fmt = formats[job.user]
                inputs = fmt.head_inputs([Example(text=t) for t in job.texts], self.device)
                probs = self.bank(users=[job.user] * len(job.texts), **inputs).logits.float().softmax(-1)
                answers[id(job)] = [dict(zip(fmt.task.labels, p.tolist(), strict=True)) for p in probs]
        if words:
            rows, targets, users, where = [], [], [], []
            for job in words:
                fmt = formats[job.user]
                room = max(len(ids) for ids in fmt.label_ids)
                for t in job.texts:
                    prompt = fmt.prompt_ids(Example(text=t), room=room)
                    for ids in fmt.label_ids:
                        rows.append(prompt + ids)
                        targets.append([-100] * len(prompt) + ids)
                        users.append(job.user)
                where.append(len(job.texts) * len(fmt.label_ids))
            scores = []
            for start in range(0, len(rows), self.max_batch):
                batch = formats[words[0].user]._pad(rows[start:start + self.max_batch], targets[start:start + self.max_batch],
                                                    self.device)
                logits = self.bank(users=users[start:start + self.max_batch], input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits
                logp = torch.log_softmax(logits[:, :-1].float(), -1)
                labels = batch["labels"][:, 1:]
                scores.append((logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)).sum(-1))
            flat = torch.cat(scores)
            offset = 0
            for job, n in zip(words, where, strict=True):
                fmt = formats[job.user]
                probs = flat[offset:offset + n].view(len(job.texts), len(fmt.label_ids)).softmax(-1)
                answers[id(job)] = [dict(zip(fmt.task.labels, p.tolist(), strict=True)) for p in probs]
                offset += n
        return [answers[id(j)] for j in jobs]

    def _format(self, user: str) -> Format:
        task = self.task(user)
        labels = task["labels"]
        spec = Task(name=task.get("name", user), kind="classification", train=[], validation=[], test=[],
                    labels=labels, label_words=task.get("label_words"))
        style = task.get("style") or ("head" if modules.head_names(self.model) else "verbalizer")
        return Format(spec, self.tokenizer, style, max_length=task.get("max_length", 128), template=task.get("template", ""))

    # generation

    def _admit(self) -> None:
        new: list[_Row] = []
        keep = {row.request.user for row in self._running if row.request.user is not None}
        while self._waiting and len(self._running) + len(new) < self.max_batch:
            handle, ids = self._waiting[0]
            if handle.cancelled:
                self._waiting.popleft()
                self._finish(_Row(handle, ids, None), "cancelled")
                continue
            try:
                resident = self._make_resident(handle.request.user, keep)
            except Exception as err:  # deleted meanwhile, or unreadable: this request fails, no other
                self._waiting.popleft()
                handle._channel.put(("error", err))
                continue
            if not resident:
                break  # the bank is full of tunings in use; wait for rows to finish
            self._waiting.popleft()
            keep.add(handle.request.user)
            seed = handle.request.seed
            generator = None
            if handle.request.temperature > 0:
                generator = torch.Generator()  # on the host: a row's samples depend on its seed alone
                generator.manual_seed(seed if seed is not None else int(time.time_ns() % (2**63)))
            new.append(_Row(handle, ids, generator))
        if not new:
            return
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

    def _step(self) -> None:
        last = torch.tensor([[row.tokens[-1]] for row in self._running], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._running), 1)], dim=1)
        logits = self.bank.decode(last, self._mask, [r.request.user for r in self._running], self._cache)
        self.stats.steps += 1
        self.stats.batch_rows.append(len(self._running))
        self._advance(self._running, logits, first=0)

    def _advance(self, rows: list[_Row], logits: torch.Tensor, first: int) -> None:
        """Sample each row's next token from its logits, stream it, and drop the rows that are done."""
        tokens = _sample(logits, [r.request for r in rows], [r.generator for r in rows])
        done = []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if row.request.keep_logits:
                row.logits.append(logits[i].float().cpu())
            reason = self._push(row, token)
            if reason is not None:
                done.append((first + i, row, reason))
        if done:
            gone = {i for i, _, _ in done}
            for _, row, reason in done:
                self._finish(row, reason)
            self._keep([i for i in range(len(self._running)) if i not in gone])

    def _push(self, row: _Row, token: int) -> str | None:
        """Add a token to a row; the reason it is finished, if it is."""
        self.stats.generated_tokens += 1
        if row.handle.cancelled:
            return "cancelled"
        if token in self.eos and not row.request.ignore_eos:
            return "stop"
        row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        stops = row.request.stop
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            row.final_text = text[:cut]
            return "stop"
        if len(row.tokens) >= row.request.max_new_tokens:
            return "length"
        # Hold back what could still turn into a stop string, or half a character.
        hold = max((len(s) - 1 for s in stops), default=0)
        ready = len(text) - hold
        while ready > row.sent and text[ready - 1] == "\ufffd":
            ready -= 1
        if ready > row.sent:
            row.handle._channel.put(("delta", text[row.sent:ready]))
            row.sent = ready
        return None

    def _finish(self, row: _Row, reason: str) -> None:
        text = row.final_text
        if text is None:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if len(text) > row.sent:
            row.handle._channel.put(("delta", text[row.sent:]))
        logits = torch.stack(row.logits) if row.logits else None
        completion = Completion(row.request.user, text, list(row.tokens), reason, len(row.prompt_ids), logits)
        row.handle._channel.put(("done", completion))

    # the running batch's cache

    def _join(self, new: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running batch: both caches left-padded to one length."""
        if not self._running:
            self._running, self._cache, self._mask = list(new), cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        joined = DynamicCache()
        for i, (old, fresh) in enumerate(zip(self._cache.layers, cache.layers, strict=True)):
            keys = torch.cat([_pad_left(old.keys, width), _pad_left(fresh.keys, width)])
            values = torch.cat([_pad_left(old.values, width), _pad_left(fresh.values, width)])
            joined.update(keys, values, i)
        self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self._cache = joined
        self._running = self._running + list(new)

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows of the running batch, and drop cache columns no remaining row sees."""
        self._running = [self._running[i] for i in rows]
        if not rows:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(rows, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        seen = mask.any(0).nonzero()
        start = int(seen[0]) if len(seen) else 0
        kept = DynamicCache()
        for i, layer in enumerate(self._cache.layers):
            kept.update(layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:], i)
        self._cache, self._mask = kept, mask[:, start:]


def _pad_left(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    extra = width - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _sample(logits: torch.Tensor, requests: list[GenerationRequest], generators: list) -> list[int]:
    """Each row's next token: greedy, or temperature and nucleus (top-p) sampling from its own generator."""
    out = logits.argmax(-1).tolist()
    for i, (request, generator) in enumerate(zip(requests, generators, strict=True)):
        if request.temperature <= 0:
            continue
        probs = (logits[i].float() / request.temperature).softmax(-1)
        if request.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            outside = ordered.cumsum(-1) - ordered >= request.top_p  # keep the smallest head reaching top_p
            ordered = ordered.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, ordered)
        out[i] = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return out


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
