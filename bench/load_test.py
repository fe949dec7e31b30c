"""`slimtune serve` under load: many concurrent clients over many users' tunings, every answer checked.

The server runs in this process (uvicorn in a thread, on 127.0.0.1 only) over a tiny random Llama by
default, or a packaged model (`--model smollm2-135m`). `--users` keys are made through the admin API,
and each uploads its own tuning (methods mixed: LoRA, prefix, prompt, adapters, BitFit; random values,
so that every user's output differs). Before the load, each user's greedy output for each prompt is
recorded alone with `engine.generate`. Then `--clients` concurrent clients (the official OpenAI
client, asyncio, in a separate process so that they do not compete with the server for the GIL) send
`--requests` completions (a share of them streamed); every answer must equal its own tuning's output
alone, and there must be no error. Bounded: a fixed number of requests, and `--timeout` seconds.

    python bench/load_test.py                              # tiny model: 64 clients, 16 users, 512 requests
    python bench/load_test.py --model smollm2-135m --requests 256

Prints and writes JSON (`--out`): latency p50/p99, requests/s and tokens/s, batch sizes, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import httpx
import torch

import slimtune
from slimtune.engine import Engine
from slimtune.keys import KeyRing
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


# --- the model and its tunings -------------------------------------------------------------------------


def tiny_model():
    """A tiny random Llama and a word-level tokenizer of its 96 ids (as the test suite's)."""
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
    return model, tokenizer


def open_model(name: str):
    if name == "tiny":
        return tiny_model()
    from slimtune.models import load_model

    return load_model(name, "generation")


def make_tunings(name: str, users: int, folder: Path, scale: float) -> list[tuple[str, Path]]:
    """One saved tuning per user, methods in turn, random values: all in one bank on a copy of the base model."""
    copy, tokenizer = open_model(name)
    bank = slimtune.Bank(copy, tokenizer)
    out = []
    for i in range(users):
        method = METHODS[i % len(METHODS)]()
        bank.add(f"user{i}", method)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in bank.user_parameters(f"user{i}"):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
        out.append((method.kind, bank.save(f"user{i}", folder / f"user{i}")))
    bank.detach()
    return out


def prompts_for(name: str, count: int) -> list[str]:
    if name != "tiny":
        return (TEXT_PROMPTS * (count // len(TEXT_PROMPTS) + 1))[:count]
    rng = random.Random(0)
    return [" ".join(f"w{rng.randrange(2, 96)}" for _ in range(rng.randrange(3, 12))) for _ in range(count)]


# --- the clients (a process of their own) ---------------------------------------------------------------


def drive(url: str, plan: list[dict], clients: int, timeout: float) -> list[dict]:
    """Send every planned request from `clients` concurrent clients; one result per request."""
    return asyncio.run(asyncio.wait_for(_drive(url, plan, clients), timeout))


async def _drive(url: str, plan: list[dict], clients: int) -> list[dict]:
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

    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        for session in sessions.values():
            await session.close()
    return results


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


# --- the run -------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def setup_users(http: httpx.Client, tunings: list[tuple[str, Path]]) -> list[dict]:
    """A key per user, made by the admin; each uploads its own tuning as "mine"."""
    users = []
    for kind, folder in tunings:
        made = http.post("/v1/keys", headers={"Authorization": f"Bearer {ADMIN}"}, json={"name": kind})
        made.raise_for_status()
        key = made.json()
        files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
        response = http.post("/v1/tunings", headers={"Authorization": f"Bearer {key['key']}"}, data={"name": "mine"},
                             files=files)
        response.raise_for_status()
        users.append({"key": key["key"], "stored": f"{key['id']}.mine", "kind": kind})
    return users


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
    p.add_argument("--out", help="JSON results (default: bench/results/load_test_<model>.json)")
    args = p.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = open_model(args.model)
        tunings = make_tunings(args.model, args.users, Path(tmp) / "saved", args.scale)
        store = slimtune.Store(Path(tmp) / "store", model)
        engine = Engine(model, tokenizer, store, max_resident=args.max_resident, max_batch=args.max_batch)
        app = create_app(engine, store, KeyRing(store.path / "keys.json", ADMIN), args.model)
        with running(app) as url, httpx.Client(base_url=url, timeout=120) as http:
            users = setup_users(http, tunings)
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
            steps_before, tokens_before = engine.stats.steps, engine.stats.generated_tokens
            started = time.perf_counter()
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                results = pool.submit(drive, url, [{k: v for k, v in item.items() if k != "want"} for item in plan],
                                      args.clients, args.timeout).result()
            wall = time.perf_counter() - started
            steps = engine.stats.steps - steps_before
            rows = list(engine.stats.batch_rows)[-steps:] if steps else []
            generated = engine.stats.generated_tokens - tokens_before
            loads, evictions = engine.stats.loads, engine.stats.evictions

    by_index = {r["index"]: r for r in results}
    errors = [r["error"] for r in results if "error" in r]
    wrong = [i for i, item in enumerate(plan) if "text" in by_index.get(i, {})
             and by_index[i]["text"] != expected[item["want"]].text]
    latencies = [r["seconds"] for r in results if "error" not in r]
    tokens = sum(r.get("tokens", 0) for r in results)
    report = {
        "command": " ".join(["python bench/load_test.py", *sys.argv[1:]]),
        "model": args.model, "users": args.users, "methods": sorted({u["kind"] for u in users}),
        "clients": args.clients, "requests": args.requests, "streamed": sum(item["stream"] for item in plan),
        "max_tokens": args.max_tokens, "max_batch": args.max_batch, "max_resident": args.max_resident,
        "answered": len(results), "errors": len(errors), "wrong_answers": len(wrong), "first_errors": errors[:5],
        "wall_seconds": round(wall, 2), "requests_per_second": round(len(latencies) / wall, 2),
        "completion_tokens_per_second": round(tokens / wall, 1), "completion_tokens": tokens,
        "latency_seconds": {"p50": round(percentile(latencies, 50), 4), "p90": round(percentile(latencies, 90), 4),
                            "p99": round(percentile(latencies, 99), 4), "max": round(max(latencies), 4)}
        if latencies else None,
        "batch_rows": {"mean": round(statistics.mean(rows), 2), "max": max(rows)} if rows else None,
        "engine_tokens": generated, "tuning_loads": loads, "tuning_evictions": evictions,
        "alone_reference_seconds": round(alone_seconds, 2),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"load_test_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = not errors and not wrong and len(results) == args.requests
    print("OK: every answer equals its tuning's output alone, no errors" if ok else
          f"FAILED: {len(errors)} errors, {len(wrong)} wrong answers, {len(results)}/{args.requests} answered")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
