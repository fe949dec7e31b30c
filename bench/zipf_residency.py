"""More tunings than slots: the engine under a Zipf-distributed trace of many users' tunings.

A store holds `--tunings` LoRA tunings (rank 8, random non-zero A and B, seeded) of one base model; the
engine keeps at most `--slots` of them resident and loads the others from the store on demand, evicting
the least recently used one. `--requests` generations arrive as a Poisson process (`--rate` requests per
second), each for a tuning drawn from a Zipf distribution over the tunings (P(rank k) ∝ 1 / k^`--zipf`),
each asking for exactly `--new` greedy tokens (end of text ignored) from a short random prompt.

The same trace (arrival times, tunings, prompts) is served by two configurations, each run by a fresh engine:

- `slots`: `max_resident=--slots` (64), fewer than the tunings the trace uses, so some requests wait for a load;
- `reference`: `max_resident=--tunings`, every tuning the trace uses fits, so each is loaded once (its first
  request) and never evicted.

For each it measures generated tokens/s over the whole run (first arrival to last token), time to first
token (to the first streamed text, from the request's scheduled arrival) and end-to-end latency, p50 and
p99, the slot hit rate = 1 - tunings loaded from the store during the run / requests (`engine.stats.loads`;
evictions too), and `Engine.memory()` at the end; then the ratios of `slots` to `reference` (throughput and
TTFT). Each engine starts cold (no tuning resident; one base-model warm-up), so even the reference loads
each distinct tuning once: `distinct_tunings` in the report, and `best_hit_rate` = 1 - distinct / requests.

The two run interleaved `--repeats` times (slots, reference, slots, ...), after one untimed warm-up of the
process on the trace's first requests; each figure is the median over the repeats, each ratio the median
of the per-repeat ratios, so a machine whose load drifts still compares like with like. An open-loop trace
near the engine's capacity is sensitive to other work on the machine: a slower stretch grows a queue. On a
machine shared with other jobs, `--threads 1` avoids oversubscribed torch threads (runs 5x slower were seen).
The default `--rate` is per model (`RATES`): the engine busy but not saturated on 2 CPU cores. A higher one
(`--rate 6` on SmolLM2-135M, 2 cores: about 4.7 requests/s fill 32 rows) saturates it: the batch is full
(`full_steps`, the share of decoding steps with `--batch` rows) and a queue grows, so the time to first token
is mostly the wait for a free row; loads then compete with full decoding steps. The engine's own load timings
are reported when it has them: `load_seconds` (reading tunings, in the background) and `load_stall_seconds`
(putting them into the bank, on the worker: the batch waits for that part).

    python bench/zipf_residency.py                   # SmolLM2-135M, 1000 tunings, 64 slots, 512 requests (est. 25 min on 2 cores)
    python bench/zipf_residency.py --tiny --tunings 200 --requests 128 --out /tmp/zipf.json   # checks the script
    python bench/zipf_residency.py --tiny --tunings 200 --requests 128 --slots 16 --out /tmp/zipf16.json  # evictions
    python bench/zipf_residency.py --rate 6 --threads 2 --out bench/results/zipf_residency_saturated.json  # a full batch

Prints one JSON line per configuration and writes `--out` (default bench/results/zipf_residency.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from many_users import _IdsTokenizer, tiny_model

import slimtune
from slimtune.engine import Engine

RATES = {"tiny": 16.0, "smollm2-135m": 1.5}  # requests/s: the engine busy, not saturated, on 2 CPU cores


def build_store(folder: Path, model, tunings: int, seed: int) -> tuple[slimtune.Store, list[str]]:
    """A store of `tunings` LoRA tunings with random A and B: one bank gives the record (method and model
    fingerprint) and the tensors' names and shapes; each tuning is its own random tensors, written once."""
    bank = slimtune.Bank(model)
    bank.add("template", slimtune.LoRA(rank=8))
    record, template = bank.saved_form("template")
    bank.detach()  # nothing stays on the shared model
    store = slimtune.Store(folder, model)
    names = [f"u{i:05d}" for i in range(tunings)]
    g = torch.Generator().manual_seed(seed)
    for name in names:
        tensors = {}
        for key, t in template.items():
            if key.endswith("lora_A"):  # [rank, in]: as LoRA's own init, U(-1/sqrt(in), 1/sqrt(in))
                bound = t.shape[1] ** -0.5
                tensors[key] = (torch.rand(t.shape, generator=g, dtype=t.dtype) * 2 - 1) * bound
            else:  # lora_B [out, rank]: non-zero, so the tuning changes the model
                tensors[key] = torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.02
        store.add(name, (record, tensors))
    return store, names


def make_trace(names: list[str], requests: int, zipf: float, rate: float, vocab: int, seed: int) -> list[dict]:
    """Arrival times (Poisson: exponential gaps), a Zipf-drawn tuning and a random prompt per request."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(names) + 1) ** zipf
    popularity = rng.permutation(len(names))  # which tuning has which rank: not the store's order
    ranks = rng.choice(len(names), size=requests, p=weights / weights.sum())
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=requests))
    arrivals -= arrivals[0]
    lengths = rng.integers(4, 17, size=requests)
    return [{"at": float(arrivals[i]), "user": names[popularity[ranks[i]]],
             "prompt": rng.integers(100, vocab - 1, size=int(lengths[i])).tolist()} for i in range(requests)]


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1)  # ms


async def replay(engine: Engine, trace: list[dict], new: int) -> tuple[float, list[dict]]:
    """Send each request at its arrival time and stream it; (seconds of the run, per-request timings)."""
    start = time.perf_counter()

    async def one(item: dict) -> dict:
        await asyncio.sleep(max(0.0, start + item["at"] - time.perf_counter()))
        sent = start + item["at"]  # the scheduled arrival: a late submission counts against the engine
        first = None
        handle = engine.astream(item["user"], item["prompt"], max_new_tokens=new, ignore_eos=True)
        async for _ in handle:
            if first is None:
                first = time.perf_counter()
        result = await handle.wait()
        end = time.perf_counter()
        return {"ttft": (first or end) - sent, "latency": end - sent, "tokens": len(result.token_ids)}

    timings = await asyncio.gather(*(one(item) for item in trace))
    return time.perf_counter() - start, timings


def serve(model, tokenizer, store, trace: list[dict], slots: int, batch: int, new: int) -> dict:
    engine = Engine(model, tokenizer, store, max_resident=slots, max_batch=batch)
    try:
        engine.generate(None, trace[0]["prompt"], max_new_tokens=4, ignore_eos=True)  # warm up: the base model only
        loads, evictions = engine.stats.loads, engine.stats.evictions
        load_times = {key: getattr(engine.stats, key, None) for key in ("load_seconds", "load_stall_seconds")}
        seconds, timings = asyncio.run(replay(engine, trace, new))
        loads, evictions = engine.stats.loads - loads, engine.stats.evictions - evictions
        load_times = {key: None if was is None else round(getattr(engine.stats, key) - was, 3)
                      for key, was in load_times.items()}  # None: an engine that loads on its worker
        memory = engine.memory() if hasattr(engine, "memory") else None
        steps = list(engine.stats.batch_rows)
    finally:
        engine.close()
        engine.bank.detach()  # the next engine gets the model without this one's hooks
    tokens = sum(t["tokens"] for t in timings)
    assert tokens == new * len(trace), f"expected {new * len(trace)} tokens, got {tokens}"
    ttft, latency = [t["ttft"] for t in timings], [t["latency"] for t in timings]
    return {
        "slots": slots, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
        "requests_per_s": round(len(trace) / seconds, 2),
        "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "latency_ms": {"p50": percentile(latency, 50), "p99": percentile(latency, 99)},
        "loads": loads, "evictions": evictions, "hit_rate": round(1 - loads / len(trace), 4),
        "mean_batch_rows": round(float(np.mean(steps)), 1) if steps else 0.0,  # of the last 1000 decoding steps
        "full_steps": round(float(np.mean([rows == batch for rows in steps])), 3) if steps else 0.0,  # of those too
        **load_times,
        "memory": memory,
    }


def summary(runs: list[dict]) -> dict:
    """The median over repeats of each figure (the memory of the last run)."""
    def med(key: str, sub: str | None = None) -> float:
        return round(statistics.median(r[key] if sub is None else r[key][sub] for r in runs), 4)

    return {"slots": runs[0]["slots"], "tokens_per_s": med("tokens_per_s"), "requests_per_s": med("requests_per_s"),
            "ttft_ms": {"p50": med("ttft_ms", "p50"), "p99": med("ttft_ms", "p99")},
            "latency_ms": {"p50": med("latency_ms", "p50"), "p99": med("latency_ms", "p99")},
            "loads": med("loads"), "evictions": med("evictions"), "hit_rate": med("hit_rate"),
            "full_steps": med("full_steps"), **{key: med(key) for key in ("load_seconds", "load_stall_seconds")
                                                if runs[0][key] is not None},
            "memory": runs[-1]["memory"], "repeats": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (checks the script in seconds)")
    p.add_argument("--tunings", type=int, default=1000, help="tunings in the store (N)")
    p.add_argument("--slots", type=int, default=64, help="max_resident of the engine under test (S)")
    p.add_argument("--batch", type=int, default=32, help="max_batch (B)")
    p.add_argument("--requests", type=int, default=512, help="requests in the trace (R)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the tunings' popularity")
    p.add_argument("--rate", type=float, default=None,
                   help=f"requests per second (Poisson); default by model: {RATES}")
    p.add_argument("--new", type=int, default=16, help="new tokens per request (greedy, end of text ignored)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each configuration")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/zipf_residency.json")
    args = p.parse_args()
    began = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared machine, fewer threads than cores avoids oversubscription
    torch.manual_seed(args.seed)
    name = "tiny" if args.tiny else "smollm2-135m"
    if args.tiny:
        model = tiny_model()
        tokenizer = _IdsTokenizer(model.config.vocab_size, model.config.eos_token_id)
    else:
        from slimtune.models import load_model

        model, tokenizer = load_model("smollm2-135m", "generation", quiet=True)
    rate = args.rate or RATES[name]
    vocab = min(model.config.vocab_size, len(tokenizer))  # prompts of ids the tokenizer knows
    with tempfile.TemporaryDirectory(prefix="zipf-store-") as folder:
        built = time.perf_counter()
        store, names = build_store(Path(folder) / "store", model, args.tunings, args.seed)
        store_seconds = time.perf_counter() - built
        trace = make_trace(names, args.requests, args.zipf, rate, vocab, args.seed)
        distinct = len({item["user"] for item in trace})
        print(json.dumps({"store": {"tunings": args.tunings, "seconds": round(store_seconds, 2)},
                          "trace": {"requests": args.requests, "distinct_tunings": distinct,
                                    "span_s": round(trace[-1]["at"], 2)}}), flush=True)
        configs = {"slots": args.slots, "reference": max(args.tunings, args.slots)}
        serve(model, tokenizer, store, trace[:args.batch], args.slots, args.batch, args.new)  # warm up the process
        runs: dict[str, list[dict]] = {config: [] for config in configs}
        for repeat in range(args.repeats):
            for config, slots in configs.items():
                runs[config].append(serve(model, tokenizer, store, trace, slots, args.batch, args.new))
                print(json.dumps({"config": config, "repeat": repeat, **runs[config][-1]}), flush=True)
    results = {config: summary(r) for config, r in runs.items()}

    def ratio(get) -> float:
        return round(statistics.median(get(s) / get(r) for s, r in zip(runs["slots"], runs["reference"], strict=True)), 3)

    ratios = {"tokens_per_s": ratio(lambda r: r["tokens_per_s"]), "ttft_p50": ratio(lambda r: r["ttft_ms"]["p50"]),
              "ttft_p99": ratio(lambda r: r["ttft_ms"]["p99"])}
    print(json.dumps({"slots_over_reference": ratios}), flush=True)
    report = {
        "meta": {"model": name, "N": args.tunings, "S": args.slots, "B": args.batch, "R": args.requests,
                 "zipf": args.zipf, "rate": rate, "new_tokens": args.new, "repeats": args.repeats, "seed": args.seed,
                 "distinct_tunings": distinct, "best_hit_rate": round(1 - distinct / args.requests, 4),
                 "store_seconds": round(store_seconds, 2), "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "python": platform.python_version(), "machine": platform.machine(),
                 "seconds": round(time.perf_counter() - began, 1)},
        "results": results,
        "slots_over_reference": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
