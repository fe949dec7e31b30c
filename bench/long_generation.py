"""Long generations and arrivals over time: the engine against transformers' `generate()` of the base model.

Short benchmarks (16 new tokens) hide what a long generation shows: a cache copied on every join, leave or
step, and text decoded again from the start at every step. In one process, on one model:

- `long`: `--rows` prompts of `--length` random tokens, `--new` new tokens each (greedy, end-of-text
  ignored): `generate()` of the base model on the whole batch, the engine serving the base model, and the
  engine serving `--rows` distinct LoRA users (rank 8, random weights); interleaved `--repeats` times,
  each ratio the median over the repeats of generate()'s time / the engine's;
- `steps`: the time of each decoding step of the engine's base-model run against the cache's width, in
  buckets (a cache that is copied at every step grows slower as the sequence grows; one written in place
  stays flat), plotted to `--plot` if matplotlib is installed;
- `arrivals`: `--arrivals` requests of `--arrival-new` new tokens, one every `--every` seconds, so rows
  join and leave a running batch, against `generate()` of all of them in one batch.

    python bench/long_generation.py --out bench/results/long_generation.json            # SmolLM2-135M
    python bench/long_generation.py --tiny --new 32 --arrivals 8 --out /tmp/long.json   # checks the script

Run it on two versions of the code (e.g. with PYTHONPATH=<other checkout>/src) to compare them: each run's
ratios are against its own interleaved `generate()`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
from many_users import _IdsTokenizer, tiny_model

import slimtune
from slimtune.engine import Engine, GenerationRequest


def prompts_of(rows: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (rows, length), generator=g)


CPU = {}  # the process's CPU seconds of the last timed call (all threads: the engine's worker too)


def timed(fn) -> float:
    """Wall seconds of `fn()`; its CPU seconds go to CPU["last"] (less moved by other jobs on the machine)."""
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    CPU["last"] = time.process_time() - cpu
    return time.perf_counter() - start


def hf_generate(model, ids: torch.Tensor, new: int, eos: int) -> float:
    return timed(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                        min_new_tokens=new, do_sample=False, pad_token_id=eos))


def served(engine: Engine, users: list, ids: torch.Tensor, new: int) -> float:
    def run():
        handles = [engine.submit(GenerationRequest(users[r], ids[r].tolist(), max_new_tokens=new, ignore_eos=True))
                   for r in range(len(users))]
        assert all(len(h.result().token_ids) == new for h in handles)

    return timed(run)


def step_times(engine: Engine) -> list[tuple[int, float]]:
    """Wraps the engine's decoding step (its compiled step, with `--compile`): (cache width, seconds) of each step
    from now on. Undo with `unwrap(engine)`."""
    out: list[tuple[int, float]] = []
    owner = engine._captured if engine._captured is not None else engine.bank
    name = "step" if engine._captured is not None else "decode"
    step = getattr(owner, name)

    def timed(ids, mask, users, cache):
        start = time.perf_counter()
        logits = step(ids, mask, users, cache)
        out.append((mask.shape[1], time.perf_counter() - start))
        return logits

    setattr(owner, name, timed)
    return out


def unwrap(engine: Engine) -> None:
    if engine._captured is not None:
        del engine._captured.step
    else:
        del engine.bank.decode


def warm(engine: Engine, users: list, ids: torch.Tensor, new: int) -> dict:
    """With `--compile`: serve the whole run until no step runs eagerly for want of a graph (each batch shape and
    cache width the run reaches gets its graph, compiled in the background), so the timed runs are compiled ones."""
    if engine._captured is None:
        return {}
    for _ in range(4):
        before = engine.stats.eager_steps_while_compiling
        served(engine, users, ids, new)
        engine._captured.wait()
        if engine.stats.eager_steps_while_compiling == before:
            break
    return {"compiles": engine._captured.compiles, "compile_seconds": round(engine._captured.compile_seconds, 1)}


def buckets(steps: list[tuple[int, float]], count: int = 8) -> list[dict]:
    steps = sorted(steps)
    size = max(1, len(steps) // count)
    out = []
    for i in range(0, len(steps), size):
        part = steps[i:i + size]
        out.append({"width_from": part[0][0], "width_to": part[-1][0],
                    "median_ms": round(1000 * statistics.median(s for _, s in part), 2)})
    return out


def arrivals(engine: Engine, ids: torch.Tensor, new: int, every: float) -> float:
    handles: list = []
    start = time.perf_counter()

    def arrive():
        for r in range(ids.shape[0]):
            handles.append(engine.submit(GenerationRequest(None, ids[r].tolist(), max_new_tokens=new, ignore_eos=True)))
            time.sleep(every)

    thread = threading.Thread(target=arrive)
    thread.start()
    thread.join()
    assert all(len(h.result().token_ids) == new for h in handles)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (checks the script in seconds)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--length", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=256, help="new tokens per row")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--arrivals", type=int, default=64)
    p.add_argument("--arrival-new", type=int, default=64)
    p.add_argument("--every", type=float, default=0.05, help="seconds between arrivals")
    p.add_argument("--out", default="bench/results/long_generation.json")
    p.add_argument("--label", default="", help="what is measured (e.g. the commit), kept in the report")
    p.add_argument("--compile", default=None, help="run the engines' decoding steps compiled with this torch.compile "
                   "backend (inductor, aot_eager), warmed up until every shape of the run has its graph")
    p.add_argument("--plot", default=None, help="a PNG of step time against cache width (needs matplotlib)")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.tiny:
        model = tiny_model()
    else:
        from slimtune.models import load_model

        model, _ = load_model("smollm2-135m", "generation")
        model.eval()
    vocab = model.config.vocab_size
    eos = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    tokenizer = _IdsTokenizer(vocab, eos)
    ids = prompts_of(args.rows, args.length, vocab, seed=1)
    compiled = args.compile or False
    base = Engine(model, tokenizer, max_batch=args.rows, compile=compiled)
    lora = Engine(model, tokenizer, max_batch=args.rows, compile=compiled)
    users = [f"u{i}" for i in range(args.rows)]
    for i, user in enumerate(users):
        lora.add(user, slimtune.LoRA(rank=8))
        g = torch.Generator().manual_seed(i)
        for param in lora.bank.user_parameters(user):
            param.data.normal_(0, 0.02, generator=g)
    tokens = args.rows * args.new
    times: dict[str, list[float]] = {"generate": [], "engine base": [], "engine lora": []}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    steps: list = []
    with torch.inference_mode():
        hf_generate(model, ids[:, :8], 4, eos)  # warm up
        served(base, [None] * args.rows, ids[:, :8], 4)
        served(lora, users, ids[:, :8], 4)
        warmed = {"engine base": warm(base, [None] * args.rows, ids, args.new),
                  "engine lora": warm(lora, users, ids, args.new)}
        eager_before = {name: e.stats.eager_steps_while_compiling for name, e in (("engine base", base), ("engine lora", lora))}
        for repeat in range(args.repeats):
            times["generate"].append(hf_generate(model, ids, args.new, eos))
            cpu["generate"].append(CPU["last"])
            recording = step_times(base) if repeat == 0 else None
            times["engine base"].append(served(base, [None] * args.rows, ids, args.new))
            cpu["engine base"].append(CPU["last"])
            if recording is not None:
                steps = recording
                unwrap(base)  # the recording wrapper: only this run's steps
            times["engine lora"].append(served(lora, users, ids, args.new))
            cpu["engine lora"].append(CPU["last"])
            print(json.dumps({k: round(v[-1], 2) for k, v in times.items()}), flush=True)
        eager_timed = {name: e.stats.eager_steps_while_compiling - eager_before[name]
                       for name, e in (("engine base", base), ("engine lora", lora))}
        lora.close()
        lora.bank.detach()
        late = prompts_of(args.arrivals, args.length, vocab, seed=2)
        batch_seconds = hf_generate(model, late, args.arrival_new, eos)
        arrival_seconds = arrivals(base, late, args.arrival_new, args.every)
    base.close()
    ratio = {name: round(statistics.median(g / t for g, t in zip(times["generate"], times[name], strict=True)), 3)
             for name in ("engine base", "engine lora")}
    cpu_ratio = {name: round(statistics.median(g / t for g, t in zip(cpu["generate"], cpu[name], strict=True)), 3)
                 for name in ("engine base", "engine lora")}
    bucketed = buckets(steps)
    report = {
        "command": "python bench/long_generation.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False) and k != "tiny")
        + (" --tiny" if args.tiny else ""),
        "model": "tiny" if args.tiny else "smollm2-135m", "rows": args.rows, "prompt_tokens": args.length,
        "new_tokens": args.new,
        "long": {name: {"tokens_per_s": round(tokens / statistics.median(t), 1), "seconds": [round(x, 2) for x in t]}
                 for name, t in times.items()},
        "long_ratio_to_generate": ratio,
        "long_cpu_ratio_to_generate": cpu_ratio,  # by CPU seconds: less moved by other jobs on the machine
        "long_cpu_seconds": {name: [round(x, 2) for x in c] for name, c in cpu.items()},
        "steps": {"buckets": bucketed,
                  "last_over_first": round(bucketed[-1]["median_ms"] / bucketed[0]["median_ms"], 3) if bucketed else None},
        "arrivals": {"requests": args.arrivals, "new_tokens": args.arrival_new, "every_s": args.every,
                     "engine_tokens_per_s": round(args.arrivals * args.arrival_new / arrival_seconds, 1),
                     "generate_one_batch_tokens_per_s": round(args.arrivals * args.arrival_new / batch_seconds, 1),
                     "ratio": round(batch_seconds / arrival_seconds, 3)},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "label": args.label,
        "compiled": {"backend": args.compile, "warm_up": warmed, "eager_steps_in_timed_runs": eager_timed}
        if args.compile else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if args.plot and steps:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot", flush=True)
            return
        widths, seconds = zip(*steps, strict=True)
        plt.figure(figsize=(6, 3.5))
        plt.scatter(widths, [1000 * s for s in seconds], s=4)
        plt.xlabel("cache width (columns)")
        plt.ylabel("decoding step (ms)")
        plt.title(f"engine, base model, {args.rows} rows")
        plt.tight_layout()
        plt.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
