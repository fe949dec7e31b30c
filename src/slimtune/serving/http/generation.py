"""Generation and classification: a request checked and tokenised, its prompts run by the engine, and the
answer, whole or streamed as server-sent events, in OpenAI's shapes.

A key may have `max_requests` generations and classifications in flight at once (429 past it), so one key
cannot fill the engine's queue; the engine shares its steps fairly between keys.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...engine import Completion, GenerationRequest
from ...keys import Caller
from .schema import (
    MAX_PROMPTS,
    APIError,
    ChatBody,
    ChunkShape,
    ClassifyBody,
    CompletionBody,
    Message,
    Prepared,
    completion_body,
    engine_error,
    error_body,
    message_text,
    parse,
    sampling_options,
    sse,
)


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



class Generation:
    """Completions, chat and classification: checked, tokenised, run by the engine, answered."""

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



async def watch_disconnect(request: Request, runs: list[Run]) -> None:
    """Cancel the runs when the client hangs up (the body is read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for run in runs:
                run.cancel()
            return

