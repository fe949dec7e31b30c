"""The HTTP API's shapes: its limits, OpenAI-style errors, request bodies and response bodies.

Request bodies are types only: their values are checked by the service, to answer 400 as OpenAI does.
Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and never name another
key's tunings or the server's paths.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pydantic_core
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from ... import adapterhub_format, storage
from ...engine import MAX_INPUTS, Completion, EngineClosedError, GenerationRequest, RequestError
from ...errors import TuningError, UnknownUserError

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


def too_large(limit: int) -> JSONResponse:
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



def tuning_card(entry, name: str) -> dict:
    return {"id": name, "object": "tuning", "created": int(entry.created), "method": entry.method, "bytes": entry.bytes,
            "task": entry.task}



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
