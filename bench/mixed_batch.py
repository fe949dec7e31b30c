"""Many users in one batch: forward (prefill) throughput of B rows, each from a different user,
against the base model alone in the same process.

Each configuration gives every row its own tuning of one method (or a mix of all), runs the
batch through `Bank`, and reports tokens/s and the ratio to the frozen base model on the same
batch. Also the naive alternative: the same users served one at a time. The weights' values do
not change the cost, so `--random` builds a SmolLM2-135M-shaped Llama from its config (for a
machine without the packaged weights, e.g. an accelerator host).

    python bench/mixed_batch.py                          # smollm2-135m, CPU, B = 16, 64 tokens
    python bench/mixed_batch.py --random --device cuda --dtype bfloat16 --rows 16 64 --length 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import slimtune

METHODS = {
    "prefix": lambda: slimtune.PrefixTuning(length=10, reparam=None, init="random"),
    "prompt": lambda: slimtune.PromptTuning(length=10, init="uniform"),
    "lora": lambda: slimtune.LoRA(rank=8),
    "adapter": lambda: slimtune.Adapter(size=64),
}


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def timed(fn, repeats: int, device: str) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random", action="store_true", help="a SmolLM2-shaped model with random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rows", type=int, nargs="+", default=[16])
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench/results/mixed_batch.json")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.random:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(smollm2_config())
        name = "smollm2-135m-shaped (random weights)"
    else:
        from slimtune.models import load_model

        model, _ = load_model("smollm2-135m")
        name = "smollm2-135m"
    model = model.to(args.device, dtype).eval()
    results = []
    for rows in args.rows:
        ids = torch.randint(100, 40000, (rows, args.length), device=args.device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            base = timed(lambda i=ids, m=mask: model(input_ids=i, attention_mask=m), args.repeats, args.device)
        tokens = rows * args.length
        results.append({"config": "base", "rows": rows, "tokens_per_s": round(tokens / base, 1), "ratio": 1.0})
        print(json.dumps(results[-1]), flush=True)
        for method in [*METHODS, "mix"]:
            bank = slimtune.Bank(model)
            kinds = list(METHODS) if method == "mix" else [method]
            users = []
            for i in range(rows):
                user = f"u{i}"
                bank.add(user, METHODS[kinds[i % len(kinds)]]())
                users.append(user)
            bank.eval()
            with torch.inference_mode():
                def mixed_batch(b=bank, i=ids, m=mask, u=users):
                    return b(input_ids=i, attention_mask=m, users=u)

                def one_at_a_time(b=bank, i=ids, m=mask, u=users):
                    return [b(input_ids=i[r : r + 1], attention_mask=m[r : r + 1], users=[u[r]]) for r in range(len(u))]

                mixed = timed(mixed_batch, args.repeats, args.device)
                one = timed(one_at_a_time, max(1, args.repeats // 2), args.device)
            bank.detach()
            for config, seconds in [(f"{method}, mixed batch", mixed), (f"{method}, one user at a time", one)]:
                results.append({"config": config, "rows": rows, "tokens_per_s": round(tokens / seconds, 1),
                                "ratio": round(base / seconds, 3)})
                print(json.dumps(results[-1]), flush=True)
    meta = {"model": name, "device": args.device, "dtype": args.dtype, "length": args.length,
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
