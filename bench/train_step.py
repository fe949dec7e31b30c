"""Training-step benchmark: median step time and peak memory of every method, beside HF PEFT.

Each configuration runs in its own process (so peak memory is its own), on the same model and the
same batch: `smollm2-135m`, 8 rows x 128 tokens of real Rotten Tomatoes text, language-model loss on
every token, AdamW. slimtune's step is the trainer's (`slimtune.train.summed_loss`); PEFT's is
`model(**batch).loss`, as its documentation trains. Run by hand:

    python bench/train_step.py                      # all configurations, writes bench/results/train_step.json
    python bench/train_step.py --only slimtune-lora --steps 3

A configuration ending in `-nf4` or `-int8` trains over the same model with its linear weights quantised
(`slimtune.quantize`; needs `pip install 'slimtune[quant]'`), beside LoRA on the fp32 base. Besides the
process's peak memory, each row gives the bytes of the loaded model's tensors as stored (`model_mb`), the
peak of the training steps alone (`peak_train_rss_gb`: the high-water mark is reset after loading, where
quantising briefly holds more), and the resident memory after them, freed memory handed back (`rss_held_gb`:
the model, every weight of it touched, the tuning and its optimizer state).

PEFT configurations need `pip install peft`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [
    "full", "slimtune-prompt", "slimtune-prefix", "slimtune-prefix-mlp", "slimtune-adapter", "slimtune-lora",
    "slimtune-bitfit", "slimtune-dora", "slimtune-ia3", "peft-prompt", "peft-prefix", "peft-lora", "peft-dora",
    "peft-ia3", "slimtune-lora-nf4", "slimtune-lora-int8", "peft-lora-nf4",
]
QUANTISED = ("-nf4", "-int8")  # the suffix of a configuration over a quantised base: the scheme


def batch(tokenizer, rows: int, length: int):
    import torch

    from slimtune.data import load_task

    texts = [e.text for e in load_task("rotten-tomatoes").train]
    ids, i = [], 0
    while len(ids) < rows:  # join reviews until each row has `length` real tokens
        row = []
        while len(row) < length:
            row += tokenizer(texts[i] + "\n", add_special_tokens=False)["input_ids"]
            i += 1
        ids.append(row[:length])
    ids = torch.tensor(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build(name: str, model, tokenizer):
    """A module whose forward(**batch) returns a loss, and the parameters to train."""
    import slimtune

    if name == "full":
        tuned = slimtune.attach(model, slimtune.FullFineTuning())
        return tuned, tuned.tuning_parameters()
    if name.startswith("slimtune-"):
        method = {
            "prompt": slimtune.PromptTuning(length=20),
            "prefix": slimtune.PrefixTuning(length=10, reparam=None),
            "prefix-mlp": slimtune.PrefixTuning(length=10, reparam="mlp"),
            "adapter": slimtune.Adapter(size=64),
            "lora": slimtune.LoRA(rank=8, alpha=16, targets=("q_proj", "v_proj")),
            "bitfit": slimtune.BitFit(add_missing=True),
            "dora": slimtune.DoRA(rank=8, alpha=16, targets=("q_proj", "v_proj")),
            "ia3": slimtune.IA3(),  # keys, values and the feed-forward output, as PEFT's default for Llama
        }[name.removeprefix("slimtune-")]
        tuned = slimtune.attach(model, method, tokenizer=tokenizer)
        return tuned, tuned.tuning_parameters()
    import peft

    config = {
        "peft-prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        "peft-prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
        "peft-lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "peft-dora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             use_dora=True),
        "peft-ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
    }[name]()
    tuned = peft.get_peft_model(model, config)
    return tuned, [p for p in tuned.parameters() if p.requires_grad]


def resident_bytes() -> int:
    """Resident memory now, after handing freed heap back to the system (glibc keeps it otherwise)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(name: str, steps: int, warmup: int, rows: int, length: int) -> dict:
    import torch

    from slimtune.models import load_model
    from slimtune.quantize import model_bytes

    torch.manual_seed(0)
    scheme = next((suffix[1:] for suffix in QUANTISED if name.endswith(suffix)), None)
    model, tokenizer = load_model("smollm2-135m", quantize=scheme)
    name = name.removesuffix(f"-{scheme}") if scheme else name
    inputs = batch(tokenizer, rows, length)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_mb = round(model_bytes(model) / 1e6, 1)
    resident_bytes()  # the heap that loading freed (quantising's fp32 copies) handed back, before the peak is reset
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark: the training steps' own peak next
    tuned, params = build(name, model, tokenizer)
    tuned.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if name.startswith("slimtune-") or name == "full":  # slimtune's training step, as `slimtune train` runs it
        from slimtune.losses import fusable_head
        from slimtune.train import summed_loss

        head = fusable_head(model)
        labels = inputs.pop("labels")
        terms = int((labels[:, 1:] != -100).sum())

        def loss_of():
            return summed_loss(tuned.bank, [tuned.user] * len(labels), dict(inputs), labels, head) / terms
    else:

        def loss_of():
            return tuned(**inputs).loss

    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "config": name + (f"-{scheme}" if scheme else ""), "median_step_s": round(statistics.median(times), 3),
        "steps_timed": steps, "peak_rss_gb": round(max(loaded_rss, peak_resident_bytes()) / 1e9, 3),
        "rss_after_load_gb": round(loaded_rss / 1e9, 3), "trainable": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(), "model_mb": model_mb,
        "peak_train_rss_gb": round(peak_resident_bytes() / 1e9, 3), "rss_held_gb": round(resident_bytes() / 1e9, 3),
    }


def peak_resident_bytes() -> int:
    """The high-water mark of resident memory (VmHWM), which `clear_refs` resets; `ru_maxrss` is not reset."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", default="bench/results/train_step.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.steps, args.warmup, args.rows, args.length)))
        return
    results = []
    for name in args.only or CONFIGS:
        command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--rows", str(args.rows), "--length", str(args.length)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            results.append({"config": name, "error": done.stderr.strip().splitlines()[-1]})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
