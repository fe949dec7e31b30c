"""`slimtune serve` under load: many concurrent clients over many users' tunings, every answer checked.

The server runs in this process (uvicorn in a thread, on 127.0.0.1 only) over a tiny random Llama by
default, or a packaged model (`--model smollm2-135m`). `--users` keys are made through the admin API,
and each uploads its own tuning (methods mixed: LoRA, prefix, prompt, adapters, BitFit; random values,
so that every user's output differs). Before the load, each user's greedy output for each prompt is
recorded alone with `engine.generate`. Then `--clients` concurrent clients (the official OpenAI
client, asyncio, in a separate process so that they do not compete with the server for the GIL) send
`--requests` completions (a share of them streamed); every answer must equal its own tuning's output
alone, and there must be no error. Bounded: a fixed number of requests, and `--timeout` seconds.

Each user's answer to each of its prompts is also checked over HTTP just before the load and just
after it (`check_before`, `check_after`: an answer that changed after the load means a tuning or the
base model was changed for everyone). During the load, a process of its own probes `/health` every
100 ms (`health_probe`: a server that freezes shows here).

`--hostile` adds a hostile tenant beside the well-behaved clients: one more key (with tunings of its
own) whose `--hostile-tasks` concurrent tasks send, in a loop for as long as the load lasts, the inputs
a security review found harmful (full fine-tunes that would write the base weights, temperatures and
top_p that underflow, a LoRA whose module pattern backtracks catastrophically, a near-limit prompt,
thousands of chat messages, malformed classification tasks and classify requests of many inputs,
records that lie about their tensors, JSON nested 100,000 deep, wrong types, a zero token budget;
see `hostile_payloads`). Each of its requests is counted by kind and outcome (the HTTP status,
"timeout", or "error:<exception>"; a stream that answers 200 and then sends an error event counts as
"200+stream_error"); an upload that is accepted is then used once ("use:<kind>"). The well-behaved
clients' figures are what matter: the hostile tenant must change none of their answers.

If the server freezes so that this process cannot even write its report, a watchdog process writes
what the client processes saved (marked `"hung": true`) once `--timeout` and a margin have passed, and
ends this process and its client processes.

    python bench/load_test.py                              # tiny model: 64 clients, 16 users, 512 requests
    python bench/load_test.py --hostile --out bench/results/load_test_tiny_hostile.json
    python bench/load_test.py --model smollm2-135m --requests 256

Prints and writes JSON (`--out`): latency p50/p99, requests/s and tokens/s, batch sizes, errors, the
health probe's latency and, with `--hostile`, the hostile tenant's outcomes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing import get_context
from pathlib import Path

import httpx
import torch

import slimtune
from slimtune import storage
from slimtune.engine import Engine
from slimtune.keys import KeyRing
from slimtune.modules import fingerprint
from slimtune.server import create_app, running

ADMIN = "load-test-admin-" + "0" * 16
METHODS = [
    lambda: slimtune.LoRA(rank=8),
    lambda: slimtune.PrefixTuning(length=5, reparam=None, init="random"),
    lambda: slimtune.PromptTuning(length=5, init="uniform"),
    lambda: slimtune.Adapter(size=16),
    lambda: slimtune.BitFit(add_missing=True),
]
TEXT_PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
                "Three things to pack for a hike:", "Translate to German: good morning", "Once upon a time,",
                "The best way to learn a language is", "Q: What is 12 times 7?\nA:"]
# Only the hostile tenant's chat requests use it: the well-behaved clients send completions.
TINY_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
REDOS_TARGETS = r"model\.la([\w.]+)+!"  # catastrophic backtracking in a backtracking engine (Python's re)
DEEP = 100_000  # nesting of the hostile JSON


# --- the model and its tunings -------------------------------------------------------------------------


def tiny_model():
    """A tiny random Llama and a word-level tokenizer of its 96 ids (as the test suite's), with a plain chat
    template (for the hostile tenant's chat requests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    words = ["<bos>", "<eos>"] + [f"w{i}" for i in range(2, 96)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>",
                                        unk_token="w2", padding_side="left")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return model, tokenizer


def open_model(name: str):
    if name == "tiny":
        return tiny_model()
    from slimtune.models import load_model

    return load_model(name, "generation")


def randomise(bank: slimtune.Bank, user: str, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.user_parameters(user):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def make_tunings(name: str, users: int, folder: Path, scale: float) -> list[tuple[str, Path]]:
    """One saved tuning per user, methods in turn, random values: all in one bank on a copy of the base model."""
    copy, tokenizer = open_model(name)
    bank = slimtune.Bank(copy, tokenizer)
    out = []
    for i in range(users):
        method = METHODS[i % len(METHODS)]()
        bank.add(f"user{i}", method)
        randomise(bank, f"user{i}", 100 + i, scale)
        out.append((method.kind, bank.save(f"user{i}", folder / f"user{i}")))
    bank.detach()
    return out


def prompts_for(name: str, count: int) -> list[str]:
    if name != "tiny":
        return (TEXT_PROMPTS * (count // len(TEXT_PROMPTS) + 1))[:count]
    rng = random.Random(0)
    return [" ".join(f"w{rng.randrange(2, 96)}" for _ in range(rng.randrange(3, 12))) for _ in range(count)]


# --- the well-behaved clients (a process of their own) --------------------------------------------------


def drive(url: str, plan: list[dict], clients: int, timeout: float, run: str | None = None,
          ready: tuple[str, ...] = ()) -> dict:
    """Send every planned request from `clients` concurrent clients: {"results": one per request answered,
    "timed_out", "seconds" (from the first request sent to the last answer)}. With `run` (a folder), this
    is the load: once run/ready-<name> exists for each of `ready` (at most a minute), it touches
    run/started before the first request and run/finished after the last (the hostile tenant and the
    probe run in between), and saves its results to run/load.json (for the watchdog)."""
    folder = Path(run) if run else None
    if folder:
        (folder / f"pid-drive-{os.getpid()}").touch()
        deadline = time.monotonic() + 60
        while not all((folder / f"ready-{name}").exists() for name in ready) and time.monotonic() < deadline:
            time.sleep(0.01)
    try:
        out = asyncio.run(_drive(url, plan, clients, timeout, folder))
    finally:
        if folder:
            (folder / "finished").touch()
    if folder:
        storage.atomic_write_json(folder / "load.json", out)
    return out


async def _drive(url: str, plan: list[dict], clients: int, timeout: float, folder: Path | None) -> dict:
    import openai

    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    sessions = {key: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600,
                                        http_client=openai.DefaultAsyncHttpxClient(limits=limits))
                for key in {p["key"] for p in plan}}

    async def client() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            results.append(await _one(sessions[item["key"]], item))

    timed_out = False
    if folder:
        (folder / "started").touch()
    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), timeout)
    except TimeoutError:
        timed_out = True
    finally:
        seconds = time.perf_counter() - started
        for session in sessions.values():
            await session.close()
    return {"results": list(results), "timed_out": timed_out, "seconds": seconds}


async def _one(session, item: dict) -> dict:
    start = time.perf_counter()
    try:
        options = {"model": item["model"], "prompt": item["prompt"], "max_tokens": item["max_tokens"], "temperature": 0}
        if item["stream"]:
            text, tokens = "", 0
            stream = await session.completions.create(**options, stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                text += "".join(c.text for c in chunk.choices)
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        else:
            out = await session.completions.create(**options)
            text, tokens = out.choices[0].text, out.usage.completion_tokens
        return {"index": item["index"], "text": text, "tokens": tokens, "seconds": time.perf_counter() - start}
    except Exception as err:
        return {"index": item["index"], "error": f"{type(err).__name__}: {err}", "seconds": time.perf_counter() - start}


# --- the health probe (a process of its own) ------------------------------------------------------------


def probe(url: str, run: str, every: float, limit: float) -> dict:
    """GET /health every `every` seconds from run/started to run/finished (at most `limit` seconds):
    each probe's seconds, and the failures by kind."""
    folder = Path(run)
    (folder / f"pid-probe-{os.getpid()}").touch()
    (folder / "ready-probe").touch()
    deadline = time.monotonic() + limit
    while not (folder / "started").exists() and not (folder / "finished").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    seconds: list[float] = []
    failures: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=10) as http:
        while not (folder / "finished").exists() and time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                status = http.get("/health").status_code
                if status != 200:
                    failures[str(status)] += 1
            except httpx.TimeoutException:
                failures["timeout"] += 1
            except httpx.HTTPError as err:
                failures[f"error:{type(err).__name__}"] += 1
            took = time.perf_counter() - start
            seconds.append(took)
            time.sleep(max(0.0, every - took))
    out = {"seconds": seconds, "failures": dict(failures)}
    storage.atomic_write_json(folder / "probe.json", out)
    return out


# --- the hostile tenant ---------------------------------------------------------------------------------


def _json(value) -> bytes:
    return json.dumps(value).encode()


def _word(model_name: str, i: int) -> str:
    return f"w{10 + i % 80}" if model_name == "tiny" else f"word{i}"


def _saved_parts(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A saved tuning's record (without what `storage.write` adds again) and tensors."""
    record, tensors = storage.read(folder)
    return {k: v for k, v in record.items() if k not in ("format", "version", "sha256")}, tensors


def _edited_copy(saved: Path, folder: Path, edit) -> Path:
    """A copy of a saved tuning whose slimtune.json is edited by `edit` (the tensors, and so the sha256, kept)."""
    folder.mkdir(parents=True)
    (folder / storage.TENSORS).write_bytes((saved / storage.TENSORS).read_bytes())
    record = json.loads((saved / storage.RECORD).read_text())
    text = edit(record)
    (folder / storage.RECORD).write_text(text if isinstance(text, str) else json.dumps(record, indent=2))
    return folder


def hostile_tuning(model_name: str, folder: Path, scale: float) -> Path:
    """The hostile key's own honest tuning, a LoRA of rank 4 (uploaded as "mine", and as "cls" with a task of
    8 labels); the lying uploads are edited copies of it."""
    copy, tokenizer = open_model(model_name)
    bank = slimtune.Bank(copy, tokenizer)
    bank.add("hostile", slimtune.LoRA(rank=4))
    randomise(bank, "hostile", 999, scale)
    lora = bank.save("hostile", folder / "lora")
    bank.detach()
    return lora


def hostile_payloads(model_name: str, lora: Path, folder: Path, prompt_bytes: int) -> list[dict]:
    """Every hostile request, prepared before the load: {kind, path, and `content` (a JSON body's bytes,
    `stream` whether it streams) or `form` and `files` (an upload: (file name, path on disk))}. Uploads are
    named after their kind, with replace=true."""
    copy, _ = open_model(model_name)
    model_print = fingerprint(copy)
    state = {name: t.detach().clone() for name, t in copy.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    changed = state["lm_head.weight"] + torch.randn(state["lm_head.weight"].shape, generator=g).to(
        state["lm_head.weight"].dtype)
    embed_shape = state["model.embed_tokens.weight"].shape
    full = {"method": {"kind": "full"}, "model": model_print}
    lm_head = storage.write(_mkdir(folder / "full-lm-head"), full, {"lm_head.weight": changed})
    whole = storage.write(_mkdir(folder / "full-state-dict"), full, {**state, "lm_head.weight": changed})
    del copy, state

    def targets(record):
        record["method"]["targets"] = REDOS_TARGETS

    def rank(record):
        record["method"]["rank"] = 64

    def deep(record):
        record["method"] = "@DEEP@"
        return json.dumps(record).replace('"@DEEP@"', "[" * DEEP + "]" * DEEP)

    redos = _edited_copy(lora, folder / "lora-redos", targets)
    rank_lie = _edited_copy(lora, folder / "lora-rank-64", rank)
    deep_record = _edited_copy(lora, folder / "lora-deep-record", deep)
    record, tensors = _saved_parts(lora)
    some = next(iter(tensors.values()))
    foreign = storage.write(_mkdir(folder / "lora-foreign"), record, {**tensors, "not_a_module.lora_A": some.clone()})
    embed = torch.randn(embed_shape, generator=g)
    base_named = storage.write(_mkdir(folder / "lora-base-weight"), record, {**tensors, "model.embed_tokens.weight": embed})

    def lora_files(path: Path) -> list[tuple[str, str]]:
        return [(name, str(path / name)) for name in (storage.RECORD, storage.TENSORS)]

    labels3 = ["good", "bad", "neutral"]
    words_missing = {"kind": "classification", "labels": labels3,
                     "label_words": {"good": _word(model_name, 0), "bad": _word(model_name, 1)}}
    labels200 = [f"label{i}" for i in range(200)]
    many_labels = {"kind": "classification", "labels": labels200,
                   "label_words": {label: _word(model_name, i) for i, label in enumerate(labels200)}}
    deep_task = '{"kind": "classification", "labels": ' + "[" * DEEP + "]" * DEEP + "}"
    uploads = {
        "upload_full_lm_head": (lm_head, None),
        "upload_full_state_dict": (whole, None),
        "upload_lora_redos_targets": (redos, None),
        "upload_cls_label_words_missing": (lora, json.dumps(words_missing)),
        "upload_cls_200_labels": (lora, json.dumps(many_labels)),
        "upload_lora_rank_64_record": (rank_lie, None),
        "upload_lora_foreign_tensor": (foreign, None),
        "upload_lora_base_weight_tensor": (base_named, None),
        "upload_deep_json_record": (deep_record, None),
        "upload_deep_json_task": (lora, deep_task),
    }
    payloads = []
    for kind, (path, task) in uploads.items():
        name = kind.removeprefix("upload_").replace("_", "-")
        form = {"name": name, "replace": "true", **({"task": task} if task is not None else {})}
        payloads.append({"kind": kind, "path": "/v1/tunings", "form": form, "files": lora_files(path), "use": name})

    word = _word(model_name, 5)
    short = f"{word} {_word(model_name, 6)} {_word(model_name, 7)}"
    for temperature, top_p in [(1e-39, None), (1e-45, None), (1e-300, None), (1.0, 1e-300)]:
        kind = f"temperature_{temperature:g}" if top_p is None else f"top_p_{top_p:g}"
        for stream in (False, True):
            body = {"model": "mine", "prompt": short, "max_tokens": 16, "temperature": temperature}
            if top_p is not None:
                body["top_p"] = top_p
            if stream:
                body["stream"] = True
            payloads.append({"kind": kind + ("_stream" if stream else ""), "path": "/v1/completions",
                             "content": _json(body), "stream": stream})
    repeat = prompt_bytes // (len(word) + 1)
    payloads += [
        {"kind": "prompt_1mib", "path": "/v1/completions",
         "content": _json({"model": "mine", "prompt": (word + " ") * repeat, "max_tokens": 16})},
        {"kind": "chat_2048_messages", "path": "/v1/chat/completions",
         "content": _json({"model": "mine", "max_tokens": 16, "messages": [
             {"role": "user" if i % 2 == 0 else "assistant", "content": short} for i in range(2048)]})},
        {"kind": "chat_100k_messages", "path": "/v1/chat/completions",
         "content": _json({"model": "mine", "max_tokens": 16,
                           "messages": [{"role": "user", "content": word}] * 100_000})},
        {"kind": "model_is_a_list", "path": "/v1/completions",
         "content": _json({"model": [1], "prompt": short, "max_tokens": 4})},
        {"kind": "max_completion_tokens_0", "path": "/v1/chat/completions",
         "content": _json({"model": "mine", "messages": [{"role": "user", "content": short}],
                           "max_completion_tokens": 0})},
        {"kind": "max_tokens_0", "path": "/v1/completions",
         "content": _json({"model": "mine", "prompt": short, "max_tokens": 0})},
        {"kind": "deep_json_body", "path": "/v1/completions",
         "content": ('{"model": "mine", "prompt": ' + "[" * DEEP + "]" * DEEP + "}").encode()},
    ]
    rng = random.Random(3)
    texts = [" ".join(_word(model_name, rng.randrange(80)) for _ in range(rng.randrange(3, 12))) for _ in range(1000)]
    for kind, model, count in [("classify_256_label_words_missing", "cls-label-words-missing", 256),
                               ("classify_256_200_labels", "cls-200-labels", 256),
                               ("classify_256_8_labels", "cls", 256),
                               ("classify_1000_8_labels", "cls", 1000)]:
        payloads.append({"kind": kind, "path": "/v1/classify", "content": _json({"model": model, "inputs": texts[:count]})})
    return payloads


def honest_payloads(model_name: str) -> list[dict]:
    """What a 17th well-behaved tenant sends in the hostile tenant's place (`--honest`): completions of its own
    tuning like the other clients' (16 tokens, one in four streamed): the anchor for a fair share."""
    payloads = []
    for i in range(4):
        prompt = " ".join(_word(model_name, 30 + i + j) for j in range(4))
        body = {"model": "mine", "prompt": prompt, "max_tokens": 16, **({"stream": True} if i == 3 else {})}
        payloads.append({"kind": "completion" + ("_stream" if i == 3 else ""), "path": "/v1/completions",
                         "content": _json(body), "stream": i == 3})
    return payloads


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def hostile(url: str, key: str, payloads: list[dict], tasks: int, request_timeout: float, run: str,
            limit: float) -> dict:
    """The hostile tenant: `tasks` concurrent tasks sending the payloads in turn (each task its own order)
    from run/started until run/finished (at most `limit` seconds); uploads one at a time (the server
    allows a key one upload at a time). Outcomes counted by kind; saved to run/hostile.json."""
    folder = Path(run)
    (folder / f"pid-hostile-{os.getpid()}").touch()
    (folder / "ready-hostile").touch()
    out = asyncio.run(_hostile(url, key, payloads, tasks, request_timeout, folder, limit))
    storage.atomic_write_json(folder / "hostile.json", out)
    return out


async def _hostile(url: str, key: str, payloads: list[dict], tasks: int, request_timeout: float, folder: Path,
                   limit: float) -> dict:
    deadline = time.monotonic() + limit
    started, finished = folder / "started", folder / "finished"
    while not started.exists() and not finished.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    counts: dict[str, Counter] = defaultdict(Counter)
    slowest: dict[str, float] = defaultdict(float)
    messages: dict[str, str] = {}
    uploading = asyncio.Lock()
    began = time.perf_counter()

    def over() -> bool:
        return finished.exists() or time.monotonic() > deadline

    async def send(http: httpx.AsyncClient, payload: dict) -> str:
        start = time.perf_counter()
        text = ""
        try:
            if "files" in payload:
                async with uploading:
                    files = [("files", (name, Path(path).read_bytes())) for name, path in payload["files"]]
                    response = await http.post(payload["path"], data=payload["form"], files=files)
                outcome, text = str(response.status_code), response.text
            elif payload.get("stream"):
                async with http.stream("POST", payload["path"], content=payload["content"],
                                       headers={"Content-Type": "application/json"}) as response:
                    body = await response.aread()
                text = body.decode(errors="replace")
                outcome = str(response.status_code)
                if response.status_code == 200 and 'data: {"error"' in text:
                    outcome += "+stream_error"
                elif response.status_code == 200 and "data: [DONE]" not in text:
                    outcome += "+stream_truncated"
            else:
                response = await http.post(payload["path"], content=payload["content"],
                                           headers={"Content-Type": "application/json"})
                outcome, text = str(response.status_code), response.text
        except httpx.TimeoutException:
            outcome = "timeout"
        except httpx.HTTPError as err:
            outcome, text = f"error:{type(err).__name__}", str(err)
        kind = payload["kind"]
        counts[kind][outcome] += 1
        slowest[kind] = max(slowest[kind], time.perf_counter() - start)
        messages.setdefault(f"{kind} {outcome}", text[:300])
        return outcome

    async def task(seed: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed)
        order = list(payloads)
        while not over():
            rng.shuffle(order)
            for payload in order:
                if over():
                    return
                if await send(http, payload) == "201" and payload.get("use"):  # accepted: use it once
                    await send(http, {"kind": f"use:{payload['kind']}", "path": "/v1/completions",
                                      "content": _json({"model": payload["use"], "prompt": "w5 w6", "max_tokens": 8})})

    timed_out = False
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=request_timeout) as http:
        try:
            await asyncio.wait_for(asyncio.gather(*(task(i, http) for i in range(tasks))),
                                   max(1.0, deadline - time.monotonic() + request_timeout))
        except TimeoutError:
            timed_out = True
    return {"counts": {kind: dict(c) for kind, c in sorted(counts.items())},
            "slowest_seconds": {kind: round(s, 3) for kind, s in sorted(slowest.items())},
            "first_messages": dict(sorted(messages.items())), "seconds": round(time.perf_counter() - began, 2),
            "timed_out": timed_out}


# --- the report ----------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def checked(out: dict | None, want: list[str]) -> dict:
    """A check's answers against each request's expected text (the output alone)."""
    results = out["results"] if out else []
    errors = [r["error"] for r in results if "error" in r]
    wrong = [r["index"] for r in results if "text" in r and r["text"] != want[r["index"]]]
    return {"requests": len(want), "answered": len(results), "errors": len(errors), "wrong_answers": len(wrong),
            "first_errors": errors[:5], "timed_out": bool(out and out["timed_out"]) or out is None}


def summarise(context: dict, load: dict | None, probe_out: dict | None, hostile_out: dict | None,
              after: dict | None, engine_figures: dict | None, hung: bool = False) -> dict:
    """The report, from what the processes returned (or saved, for the watchdog)."""
    results = load["results"] if load else []
    want = context["want"]
    errors = [r["error"] for r in results if "error" in r]
    wrong = [r["index"] for r in results if "text" in r and r["text"] != want[r["index"]]]
    latencies = [r["seconds"] for r in results if "error" not in r]
    tokens = sum(r.get("tokens", 0) for r in results)
    wall = load["seconds"] if load else None
    health = None
    if probe_out and probe_out["seconds"]:
        seconds = probe_out["seconds"]
        health = {"probes": len(seconds), "every_seconds": 0.1, "failures": probe_out["failures"],
                  "p50": round(percentile(seconds, 50), 4), "p99": round(percentile(seconds, 99), 4),
                  "max": round(max(seconds), 4)}
    report = {
        **context["head"],
        "answered": len(results), "errors": len(errors), "wrong_answers": len(wrong), "first_errors": errors[:5],
        "load_timed_out": bool(load and load["timed_out"]) or load is None,
        "wall_seconds": round(wall, 2) if wall else None,
        "requests_per_second": round(len(latencies) / wall, 2) if wall else None,
        "completion_tokens_per_second": round(tokens / wall, 1) if wall else None, "completion_tokens": tokens,
        "latency_seconds": {"p50": round(percentile(latencies, 50), 4), "p90": round(percentile(latencies, 90), 4),
                            "p99": round(percentile(latencies, 99), 4), "max": round(max(latencies), 4)}
        if latencies else None,
        **(engine_figures or {}),
        "check_before": context["check_before"],
        "check_after": checked(after, context["check_want"]) if not hung else None,
        "health_probe": health,
    }
    if context["head"]["hostile"] or context["head"].get("honest"):
        name = "hostile_tenant" if context["head"]["hostile"] else "honest_tenant"
        if hostile_out:
            by_status: Counter[str] = Counter()
            for outcomes in hostile_out["counts"].values():
                by_status.update(outcomes)
            report[name] = {"tasks": context["hostile_tasks"], "requests": sum(by_status.values()),
                            "by_status": dict(sorted(by_status.items())), **hostile_out}
        else:
            report[name] = None
    report["hung"] = hung
    report["alone_reference_seconds"] = context["alone_reference_seconds"]
    report["source"], report["machine"] = context["source"], context["machine"]
    return report


def source() -> dict:
    """The commit measured, and the files that differ from it (other work in the same tree)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "changed_under_src": changed}


def watchdog(run: str, out: str, seconds: float, grace: float, main_pid: int) -> None:
    """If this process is not ended within `seconds`, or `grace` seconds after run/finished appears (the
    run is over by then), the server froze this benchmark's process: write the report from what the client
    processes saved, and end them and the benchmark (and remove its temporary folder)."""
    folder = Path(run)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (folder / "finished").exists():
            deadline = min(deadline, time.monotonic() + grace)
            seconds = grace
            time.sleep(max(0.0, deadline - time.monotonic()))
            break
        time.sleep(0.5)

    def saved(name: str) -> dict | None:
        path = folder / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    context = saved("context")
    if context is not None:
        report = summarise(context, saved("load"), saved("probe"), saved("hostile"), None, None, hung=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2), flush=True)
    print(f"HUNG: the benchmark's process did not finish within {seconds:.0f} s; ended it", file=sys.stderr,
          flush=True)
    for pid in [int(p.name.rsplit("-", 1)[1]) for p in folder.glob("pid-*")] + [main_pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(folder.parent, ignore_errors=True)


# --- the run -------------------------------------------------------------------------------------------------


def upload(http: httpx.Client, key: str, name: str, folder: Path, task: dict | None = None) -> None:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
    data = {"name": name, **({"task": json.dumps(task)} if task else {})}
    response = http.post("/v1/tunings", headers={"Authorization": f"Bearer {key}"}, data=data, files=files)
    response.raise_for_status()


def make_key(http: httpx.Client, name: str) -> dict:
    made = http.post("/v1/keys", headers={"Authorization": f"Bearer {ADMIN}"}, json={"name": name})
    made.raise_for_status()
    return made.json()


def setup_users(http: httpx.Client, tunings: list[tuple[str, Path]]) -> list[dict]:
    """A key per user, made by the admin; each uploads its own tuning as "mine"."""
    users = []
    for kind, folder in tunings:
        key = make_key(http, kind)
        upload(http, key["key"], "mine", folder)
        users.append({"key": key["key"], "stored": f"{key['id']}.mine", "kind": kind})
    return users


def setup_hostile(http: httpx.Client, model_name: str, lora: Path) -> str:
    """The hostile tenant's key, with its honest LoRA as "mine" and as the classification tuning "cls"."""
    key = make_key(http, "hostile")["key"]
    upload(http, key, "mine", lora)
    labels = [f"label{i}" for i in range(8)]
    upload(http, key, "cls", lora, {"kind": "classification", "labels": labels,
                                    "label_words": {label: _word(model_name, 20 + i) for i, label in enumerate(labels)}})
    return key


def model_folder(name: str, folder: Path) -> str:
    """What replicas open: the packaged model's name, or the tiny model saved to a folder."""
    if name != "tiny":
        return name
    model, tokenizer = tiny_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def resident_figures(http: httpx.Client, key: str, replicas: int, within: float = 60.0) -> dict:
    """Each replica's tuning loads and evictions, from its /metrics (answered by one replica at a time)."""
    from slimtune.serving.ray import REPLICA_HEADER

    seen: dict[str, dict] = {}
    deadline = time.monotonic() + within
    while len(seen) < replicas and time.monotonic() < deadline:
        response = http.get("/metrics", headers={"Authorization": f"Bearer {key}"})
        figures = {}
        for line in response.text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("slimtune_tuning_loads", "slimtune_tuning_evictions", "slimtune_resident_tunings"):
                figures[name.removeprefix("slimtune_")] = float(value)
        seen.setdefault(response.headers.get(REPLICA_HEADER.decode(), "single"), figures)
    return seen


def replicas_main(args) -> int:
    """`--replicas N`: the same load against the single-process server, N replicas routed by tuning, and N
    replicas balanced without routing (the less busy of two at random, Ray Serve's default), in turn, `--rounds`
    times, in one run; every answer checked. Each configuration starts on a fresh store."""
    import ray

    from slimtune.serving import ray as on_ray
    from slimtune.serving.http.app import ServerOptions, open_app

    out = Path(args.out or Path(__file__).parent / "results" / f"load_test_{args.model}_replicas{args.replicas}.json")
    ctx = get_context("spawn")
    configs = ["single", "routed", "unrouted"]
    report: dict = {"command": " ".join(["python bench/load_test.py", *sys.argv[1:]]), "model": args.model,
                    "users": args.users, "clients": args.clients, "requests": args.requests,
                    "max_tokens": args.max_tokens, "max_resident_per_server": args.max_resident,
                    "replicas": args.replicas, "configs": {}, "source": source(),
                    "machine": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                                "cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory() as tmp:
        base = model_folder(args.model, Path(tmp) / "model")
        tunings = make_tunings(args.model, args.users, Path(tmp) / "saved", args.scale)
        model, tokenizer = open_model(args.model)
        prompts = prompts_for(args.model, args.prompts * args.users)
        with Engine(model, tokenizer, max_resident=args.users) as alone:
            for i, (_, folder) in enumerate(tunings):
                alone.add(f"user{i}", folder)
            expected = {(u, j): alone.generate(f"user{u}", prompts[u * args.prompts + j], max_new_tokens=args.max_tokens).text
                        for u in range(args.users) for j in range(args.prompts)}
        rng = random.Random(1)
        draws = [(i % args.users, rng.randrange(args.prompts), rng.random() < args.stream_share)
                 for i in range(args.requests)]
        rng.shuffle(draws)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            for round_, config in [(r, c) for r in range(args.rounds) for c in configs]:
                options = ServerOptions(model=base, store=str(Path(tmp) / f"store-{config}-{round_}"),
                                        max_resident=args.max_resident, max_batch=args.max_batch)
                if config == "single":
                    server = running(open_app(options, ADMIN))
                    url = server.__enter__()
                else:
                    url = on_ray.start(options, ADMIN, replicas=args.replicas, port=18800, routed=config == "routed")
                try:
                    with httpx.Client(base_url=url, timeout=120) as http:
                        users = setup_users(http, tunings)
                        plan = [{"index": i, "key": users[u]["key"], "model": "mine",
                                 "prompt": prompts[u * args.prompts + j], "max_tokens": args.max_tokens, "stream": st}
                                for i, (u, j, st) in enumerate(draws)]
                        want = [expected[(u, j)] for u, j, _ in draws]
                        before = resident_figures(http, users[0]["key"], 1 if config == "single" else args.replicas)
                        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                            load = pool.submit(drive, url, plan, args.clients, args.timeout).result()
                        after = resident_figures(http, users[0]["key"], 1 if config == "single" else args.replicas)
                finally:
                    if config == "single":
                        server.__exit__(None, None, None)
                    else:
                        on_ray.stop(shutdown=False)
                results = load["results"]
                errors = [r["error"] for r in results if "error" in r]
                wrong = [r["index"] for r in results if "text" in r and r["text"] != want[r["index"]]]
                latencies = [r["seconds"] for r in results if "error" not in r]
                loads = sum(f.get("tuning_loads", 0) for f in after.values()) - sum(
                    f.get("tuning_loads", 0) for f in before.values())
                report["configs"].setdefault(config, []).append({
                    "answered": len(results), "errors": len(errors), "wrong_answers": len(wrong),
                    "first_errors": errors[:5], "timed_out": load["timed_out"], "wall_seconds": round(load["seconds"], 2),
                    "requests_per_second": round(len(latencies) / load["seconds"], 2),
                    "latency_seconds": {"p50": round(percentile(latencies, 50), 4),
                                        "p99": round(percentile(latencies, 99), 4)} if latencies else None,
                    "tuning_loads_during_load": int(loads),
                    "residency_hit_rate": round(1 - loads / max(1, len(latencies)), 3),
                    "per_replica_after": after})
                print(config, json.dumps(report["configs"][config][-1]), flush=True)
        finally:
            ray.shutdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    report["median"] = {config: {figure: statistics.median(run[figure] for run in runs)
                                 for figure in ("requests_per_second", "residency_hit_rate")}
                        for config, runs in report["configs"].items()}
    print(json.dumps(report["median"]))
    ok = all(c["errors"] == 0 and c["wrong_answers"] == 0 and c["answered"] == args.requests
             for runs in report["configs"].values() for c in runs)
    print("OK: every answer equals its tuning's output alone, no errors" if ok else "FAILED: errors or wrong answers")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (a random Llama built from a config) or smollm2-135m")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--prompts", type=int, default=4, help="prompts per user")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stream-share", type=float, default=0.25, help="share of the requests that stream")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-resident", type=int, default=64)
    p.add_argument("--scale", type=float, default=0.1, help="size of the tunings' random values")
    p.add_argument("--timeout", type=float, default=900, help="seconds the load may take at most")
    p.add_argument("--hostile", action="store_true", help="add the hostile tenant beside the well-behaved clients")
    p.add_argument("--honest", action="store_true",
                   help="add a 17th, well-behaved tenant in the hostile tenant's place (same tasks, same loop): what a "
                        "fair share costs the others")
    p.add_argument("--hostile-tasks", type=int, default=4, help="the hostile (or honest) tenant's concurrent requests")
    p.add_argument("--hostile-timeout", type=float, default=30, help="seconds one hostile request may take")
    p.add_argument("--replicas", type=int, default=0,
                   help="compare the single-process server with this many replicas on Ray Serve, routed by tuning and "
                        "not (the same load against each, one after the other)")
    p.add_argument("--rounds", type=int, default=1, help="with --replicas: run the configurations in turn this many times")
    p.add_argument("--out", help="JSON results (default: bench/results/load_test_<model>.json)")
    args = p.parse_args()
    if args.replicas:
        return replicas_main(args)
    if args.hostile and args.honest:
        p.error("--hostile and --honest put a tenant in the same place: choose one")
    extra = args.hostile or args.honest  # a 17th tenant beside the clients
    torch.manual_seed(0)
    out = Path(args.out or Path(__file__).parent / "results" / f"load_test_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_timeout = min(args.timeout, 120)
    ctx = get_context("spawn")

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        model, tokenizer = open_model(args.model)
        tunings = make_tunings(args.model, args.users, Path(tmp) / "saved", args.scale)
        if extra:
            lora = hostile_tuning(args.model, Path(tmp) / "hostile", args.scale)
            payloads = (hostile_payloads(args.model, lora, Path(tmp) / "hostile", 2**20) if args.hostile
                        else honest_payloads(args.model))
        store = slimtune.Store(Path(tmp) / "store", model)
        engine = Engine(model, tokenizer, store, max_resident=args.max_resident, max_batch=args.max_batch)
        app = create_app(engine, store, KeyRing(store.path / "keys.json", ADMIN), args.model)
        with running(app) as url, httpx.Client(base_url=url, timeout=120) as http:
            users = setup_users(http, tunings)
            hostile_key = setup_hostile(http, args.model, lora) if extra else None
            prompts = prompts_for(args.model, args.prompts * args.users)
            started = time.perf_counter()
            expected = {(u, j): engine.generate(user["stored"], prompts[u * args.prompts + j], max_new_tokens=args.max_tokens)
                        for u, user in enumerate(users) for j in range(args.prompts)}
            alone_seconds = time.perf_counter() - started
            rng = random.Random(1)
            plan = []
            for i in range(args.requests):
                u, j = i % args.users, rng.randrange(args.prompts)
                plan.append({"index": i, "key": users[u]["key"], "model": "mine", "prompt": prompts[u * args.prompts + j],
                             "max_tokens": args.max_tokens, "stream": rng.random() < args.stream_share, "want": (u, j)})
            checks = [{"index": i, "key": users[u]["key"], "model": "mine", "prompt": prompts[u * args.prompts + j],
                       "max_tokens": args.max_tokens, "stream": False, "want": (u, j)}
                      for i, (u, j) in enumerate(expected)]

            def sent(items: list[dict]) -> list[dict]:
                return [{k: v for k, v in item.items() if k != "want"} for item in items]

            check_want = [expected[item["want"]].text for item in checks]
            with ProcessPoolExecutor(3 if extra else 2, mp_context=ctx) as pool:
                before = pool.submit(drive, url, sent(checks), min(args.clients, 16), check_timeout).result()
                context = {
                    "head": {"command": " ".join(["python bench/load_test.py", *sys.argv[1:]]),
                             "model": args.model, "users": args.users, "methods": sorted({u["kind"] for u in users}),
                             "clients": args.clients, "requests": args.requests,
                             "streamed": sum(item["stream"] for item in plan), "max_tokens": args.max_tokens,
                             "max_batch": args.max_batch, "max_resident": args.max_resident, "hostile": args.hostile,
                             "honest": args.honest},
                    "want": [expected[item["want"]].text for item in plan], "check_want": check_want,
                    "check_before": checked(before, check_want), "hostile_tasks": args.hostile_tasks,
                    "alone_reference_seconds": round(alone_seconds, 2), "source": source(),
                    "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                                "torch_threads": torch.get_num_threads()},
                }
                storage.atomic_write_json(run / "context.json", context)
                limit = args.timeout + 120  # the load, and the clients' start before it
                grace = args.hostile_timeout + check_timeout + 120  # after the load: the tenant's last, the check
                guard = ctx.Process(target=watchdog, daemon=True,
                                    args=(str(run), str(out), limit + grace, grace, os.getpid()))
                guard.start()
                steps_before, tokens_before = engine.stats.steps, engine.stats.generated_tokens
                probing = pool.submit(probe, url, str(run), 0.1, limit)
                attacking = (pool.submit(hostile, url, hostile_key, payloads, args.hostile_tasks, args.hostile_timeout,
                                         str(run), limit) if extra else None)
                ready = ["probe", "hostile"] if extra else ["probe"]
                try:
                    load = pool.submit(drive, url, sent(plan), args.clients, args.timeout, str(run),
                                       tuple(ready)).result(
                        timeout=limit + 60)
                except FutureTimeout:
                    load = None
                (run / "finished").touch()  # (the driver's own, unless it never ran)
                steps = engine.stats.steps - steps_before
                rows = list(engine.stats.batch_rows)[-steps:] if steps else []
                engine_figures = {
                    "batch_rows": {"mean": round(statistics.mean(rows), 2), "max": max(rows)} if rows else None,
                    "engine_tokens": engine.stats.generated_tokens - tokens_before, "tuning_loads": engine.stats.loads,
                    "tuning_evictions": engine.stats.evictions}
                probe_out = _result(probing, 60)
                hostile_out = _result(attacking, args.hostile_timeout + 60) if attacking else None
                after = pool.submit(drive, url, sent(checks), min(args.clients, 16), check_timeout).result()

    report = summarise(context, load, probe_out, hostile_out, after, engine_figures)
    out.write_text(json.dumps(report, indent=2) + "\n")
    guard.terminate()
    print(json.dumps(report, indent=2))
    ok = (not report["errors"] and not report["wrong_answers"] and report["answered"] == args.requests
          and all(not c["errors"] and not c["wrong_answers"] and c["answered"] == c["requests"]
                  for c in (report["check_before"], report["check_after"])))
    print("OK: every answer equals its tuning's output alone, no errors" if ok else
          f"FAILED: {report['errors']} errors, {report['wrong_answers']} wrong answers, "
          f"{report['answered']}/{args.requests} answered; before the load {report['check_before']['wrong_answers']} "
          f"wrong and {report['check_before']['errors']} errors, after it {report['check_after']['wrong_answers']} "
          f"wrong and {report['check_after']['errors']} errors")
    return 0 if ok else 1


def _result(future, seconds: float):
    try:
        return future.result(timeout=seconds)
    except FutureTimeout:
        return None


if __name__ == "__main__":
    sys.exit(main())
