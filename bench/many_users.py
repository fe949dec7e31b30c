"""Many users, one batch: what serving B users' tunings together costs against the base model alone.

In one process, on one model, with B rows each from a *different* user:

- forward (prefill) tokens/s of a mixed batch through `Bank`, for prefix tuning, prompt tuning,
  LoRA, Houlsby adapters and a mix of all four, as a ratio to the frozen base model on the same
  batch; and the same users served one at a time (the naive loop);
- generation tokens/s through `Engine` (continuous batching, greedy, exactly `--new` tokens per
  row), as a ratio to transformers' own `generate()` of the base model on the same prompts;
- HF PEFT on the same model: LoRA with its mixed `adapter_names` batch, and prompt and prefix
  tuning through one `set_adapter` + forward (or generate) per user, since PEFT cannot mix them;
  plus two correctness checks of PEFT against slimtune;
- throughput (prefill and one decoding step) and memory as the bank holds 1, 16, 256 and 1,024 tunings
  (`--stored`; `--stored-methods lora --stored 4096`: 4,096 LoRA tunings), B distinct users drawn from them;
- one decoding step after a prefill (`Bank.decode`, a transformers cache), each method's mixed batch against
  the base model: its time, and its top-level `aten::` ops (`torch.profiler`), the CPU's stand-in for a GPU's
  kernel launches;
- memory kept across batch layouts: 24 random mixes of B users served in turn, and the bytes the
  methods hold beyond their users' parameters before and after;
- the compiled decoding step (`Engine(compile=...)`, `--compile` names the backend): each method's
  mixed batch against the compiled base model, the compiled base against the eager one, compile time,
  graph breaks and top-level ops.

Timings interleave the base model and the configuration (base, config, base, config, ...) and
report the median of the per-pair ratios, so a machine whose load drifts still compares like with
like.

    python bench/many_users.py                      # smollm2-135m, CPU, B = 16 and 64, 64 tokens
    python bench/many_users.py --tiny               # a tiny random Llama: checks the script in seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import slimtune
from slimtune.engine import Engine, GenerationRequest

METHODS = {
    "prefix": lambda: slimtune.PrefixTuning(length=10, reparam=None, init="random"),
    "prompt": lambda: slimtune.PromptTuning(length=10, init="uniform"),
    "lora": lambda: slimtune.LoRA(rank=8),
    "adapter": lambda: slimtune.Adapter(size=64),
    "bitfit": lambda: slimtune.BitFit(add_missing=True),  # Llama has no biases
    "ia3": lambda: slimtune.IA3(),
    "dora": lambda: slimtune.DoRA(rank=8),
}


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config).eval()


class _IdsTokenizer:
    """The engine needs a tokenizer only for text; the benchmark sends token ids."""

    def __init__(self, vocab: int, eos: int):
        self.vocab, self.eos_token_id, self.pad_token_id = vocab, eos, eos

    def __len__(self) -> int:
        return self.vocab

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def paired(base, config, repeats: int, device: str) -> tuple[float, float, float]:
    """(median base seconds, median config seconds, median of base/config over interleaved pairs)."""
    base(), config()  # warm up
    pairs = [(seconds(base, device), seconds(config, device)) for _ in range(repeats)]
    return (statistics.median(b for b, _ in pairs), statistics.median(c for _, c in pairs),
            statistics.median(b / c for b, c in pairs))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def make_bank(model, users: int, kinds: list[str], slots: int = 0) -> tuple[slimtune.Bank, list[str]]:
    """A bank of `users` tunings of `kinds` in turn, as an engine holds them (`serving`: tunings change only by
    add and remove; `slots`: each table made with room for that many, as an engine makes them for `max_resident`)."""
    bank = slimtune.Bank(model, serving=True, slots=slots)
    names = []
    for i in range(users):
        bank.add(f"u{i}", METHODS[kinds[i % len(kinds)]]())
        names.append(f"u{i}")
    return bank.eval(), names


def tuning_bytes(bank: slimtune.Bank) -> int:
    return sum(p.numel() * p.element_size() for user in bank.users for p in bank.user_parameters(user))


def extra_bytes(bank: slimtune.Bank) -> int:
    """What the methods hold beyond the parameters of tunings without a slot: slot tables, the last layout's
    gathered parameters and values kept between calls (`Bank.memory`)."""
    memory = bank.memory()
    return memory["tables"] + memory["layout"] + memory["kept"]


def top_level_ops(fn) -> int:
    """`aten::` ops that `fn()` calls directly (not those that other aten ops call). Of a compiled step, only the
    aten calls left outside the generated code: inductor's own kernels are not in the profile (unless
    `torch._inductor.config.cpp.enable_kernel_profile` is set)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        if event.name.startswith("aten::"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            count += parent is None
    return count


def decoder(bank: slimtune.Bank, users: list, ids: torch.Tensor, mask: torch.Tensor):
    """A function running one more decoding step of `users`' rows after a prefill of `ids` (greedy), and that first
    step run (it may set up what later steps reuse)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    logits, columns = bank.prefill(ids, mask, users, cache)
    state = {"logits": logits, "columns": columns}

    def step():
        state["columns"] = torch.cat([state["columns"], state["columns"].new_ones(ids.shape[0], 1)], dim=1)
        state["logits"] = bank.decode(state["logits"].argmax(-1, keepdim=True), state["columns"], users, cache)

    step()
    return step


def compiled_decoder(bank: slimtune.Bank, users: list, ids: torch.Tensor, mask: torch.Tensor, backend: str):
    """As `decoder`, through the engine's compiled step (`serving.capture`) on the engine's KV cache; the first
    step compiles. Returns (step, the CapturedStep)."""
    from transformers import DynamicCache

    from slimtune.serving.capture import CapturedStep
    from slimtune.serving.kv import SlotCache

    cache = DynamicCache()
    logits, columns = bank.prefill(ids, mask, users, cache)
    slots = SlotCache(cache, ids.shape[0])
    captured = CapturedStep(bank, 0, backend)
    state = {"logits": logits, "columns": columns}

    def step():
        seen = torch.cat([state["columns"], state["columns"].new_ones(ids.shape[0], 1)], dim=1)
        slots.reserve(1)
        state["logits"] = captured.step(state["logits"].argmax(-1, keepdim=True), seen, users, slots)
        state["columns"] = seen

    step()
    return step, captured


class Bench:
    def __init__(self, model, args):
        self.model, self.args, self.results = model, args, []
        self.device = args.device
        self.vocab = model.config.vocab_size
        self.eos = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    def record(self, section: str, config: str, rows: int, tokens: int, seconds_: float, ratio: float, **extra) -> None:
        row = {"section": section, "config": config, "rows": rows, "tokens_per_s": round(tokens / seconds_, 1),
               "ratio_to_base": round(ratio, 3), **extra}
        self.results.append(row)
        print(json.dumps(row), flush=True)

    def batch(self, rows: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(100, self.vocab - 1, (rows, self.args.length), generator=g).to(self.device)
        return ids, torch.ones_like(ids)

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, rows: int) -> None:
        ids, mask = self.batch(rows)
        tokens = rows * self.args.length
        model = self.model

        def base():
            return model(input_ids=ids, attention_mask=mask)

        with torch.inference_mode():
            for method in self.args.methods:
                bank, users = make_bank(model, rows, list(METHODS) if method == "mix" else [method])

                def mixed(b=bank, u=users):
                    return b(input_ids=ids, attention_mask=mask, users=u)

                def loop(b=bank, u=users):
                    return [b(input_ids=ids[r:r + 1], attention_mask=mask[r:r + 1], users=[u[r]]) for r in range(rows)]

                _, s, ratio = paired(base, mixed, self.args.repeats, self.device)
                self.record("forward", f"slimtune {method}, mixed batch", rows, tokens, s, ratio)
                if rows <= self.args.loop_rows:
                    _, s, ratio = paired(base, loop, max(1, self.args.repeats // 2), self.device)
                    self.record("forward", f"slimtune {method}, one user at a time", rows, tokens, s, ratio)
                bank.detach()

    # --- generation ------------------------------------------------------------------------------

    def generation(self, rows: int) -> None:
        ids, mask = self.batch(rows, seed=1)
        new = self.args.new
        tokens = rows * new
        model = self.model
        prompts = [ids[r].tolist() for r in range(rows)]

        def hf_base():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=self.eos)

        tokenizer = _IdsTokenizer(self.vocab, self.eos)
        for method in ["base", *self.args.methods]:
            engine = Engine(model, tokenizer, max_batch=rows)
            if method == "base":
                users = [None] * rows
            else:
                kinds = list(METHODS) if method == "mix" else [method]
                users = [f"u{i}" for i in range(rows)]
                for i, user in enumerate(users):
                    engine.add(user, METHODS[kinds[i % len(kinds)]]())

            def served(e=engine, u=users):
                handles = [e.submit(GenerationRequest(u[r], prompts[r], max_new_tokens=new, ignore_eos=True))
                           for r in range(rows)]
                assert all(len(h.result().token_ids) == new for h in handles)

            def one_at_a_time(e=engine, u=users):
                for r in range(rows):
                    e.generate(u[r], prompts[r], max_new_tokens=new, ignore_eos=True)

            with torch.inference_mode():
                _, s, ratio = paired(hf_base, served, self.args.repeats, self.device)
                self.record("generation", f"slimtune engine {method}, continuous batch", rows, tokens, s, ratio)
                if method != "base" and rows <= self.args.loop_rows:
                    _, s, ratio = paired(hf_base, one_at_a_time, 1, self.device)
                    self.record("generation", f"slimtune engine {method}, one user at a time", rows, tokens, s, ratio)
            engine.close()
            engine.bank.detach()

    # --- PEFT ------------------------------------------------------------------------------------

    def peft(self, rows: int) -> None:
        try:
            import peft
        except ImportError:
            print("peft is not installed: skipping the PEFT comparison (pip install peft)", flush=True)
            return
        from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

        ids, mask = self.batch(rows)
        tokens = rows * self.args.length
        gen_ids, gen_mask = self.batch(rows, seed=1)
        new = self.args.new
        model = self.model

        def base():
            return model(input_ids=ids, attention_mask=mask)

        def hf_base():
            return model.generate(input_ids=gen_ids, attention_mask=gen_mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=self.eos)

        configs = {
            "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
            "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
        }
        for method, config in configs.items():
            users = [f"u{i}" for i in range(rows)]
            wrapped = get_peft_model(copy.deepcopy(model), config(), adapter_name=users[0]).eval()
            for user in users[1:]:
                wrapped.add_adapter(user, config())
            with torch.inference_mode():
                if method == "lora":
                    def run(w=wrapped, u=users):
                        return w(input_ids=ids, attention_mask=mask, adapter_names=u)

                    def generate(w=wrapped, u=users):
                        return w.generate(input_ids=gen_ids, attention_mask=gen_mask, adapter_names=u, max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=self.eos)
                    label = "mixed adapter_names batch"
                else:
                    def run(w=wrapped, u=users):
                        out = []
                        for r, user in enumerate(u):
                            w.set_adapter(user)
                            out.append(w(input_ids=ids[r:r + 1], attention_mask=mask[r:r + 1]))
                        return out

                    def generate(w=wrapped, u=users):
                        out = []
                        for r, user in enumerate(u):
                            w.set_adapter(user)
                            out.append(w.generate(input_ids=gen_ids[r:r + 1], attention_mask=gen_mask[r:r + 1],
                                                  max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                                  pad_token_id=self.eos))
                        return out
                    label = "set_adapter + one user at a time"
                _, s, ratio = paired(base, run, self.args.repeats, self.device)
                self.record("forward", f"PEFT {peft.__version__} {method}, {label}", rows, tokens, s, ratio)
                if method == "lora" or rows <= self.args.loop_rows:  # a per-user generate() loop is slow to time
                    _, s, ratio = paired(hf_base, generate, max(1, self.args.repeats // 2), self.device)
                    self.record("generation", f"PEFT {peft.__version__} {method}, {label}", rows, rows * new, s, ratio)
            del wrapped

    def peft_correctness(self) -> dict:
        """The two PEFT behaviours worth knowing, each against slimtune on the same model."""
        try:
            import peft
            from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
        except ImportError:
            return {}
        ids, mask = self.batch(2)
        out = {"peft": peft.__version__}
        with torch.inference_mode():
            # 1. Prompt tuning with adapter_names: does each row get its own prompt?
            wrapped = get_peft_model(copy.deepcopy(self.model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
                                     adapter_name="a").eval()
            wrapped.add_adapter("b", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10))
            try:
                mixed = wrapped(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"]).logits[1]
                wrapped.set_adapter("b")
                alone = wrapped(input_ids=ids[1:], attention_mask=mask[1:]).logits[0]
                out["peft_prompt_mixed_row_b_max_abs_diff_from_alone"] = float((mixed - alone).abs().max())
            except Exception as err:  # a refusal is an answer too
                out["peft_prompt_mixed_error"] = f"{type(err).__name__}: {err}"[:300]
            bank, _ = make_bank(self.model, 0, [])
            bank.add("a", METHODS["prompt"]())
            bank.add("b", METHODS["prompt"]())
            mixed = bank(input_ids=ids, attention_mask=mask, users=["a", "b"]).logits[1]
            alone = bank(input_ids=ids[1:], attention_mask=mask[1:], users=["b"]).logits[0]
            out["slimtune_prompt_mixed_row_b_max_abs_diff_from_alone"] = float((mixed - alone).abs().max())
            bank.detach()
            # 2. Prefix tuning's generate(): does the prefix change the text at all?
            prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
            wrapped = get_peft_model(copy.deepcopy(self.model), prefix).eval()
            with torch.no_grad():
                for p in wrapped.prompt_encoder.parameters():
                    p.mul_(20.0)  # a prefix strong enough to change the text
            kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": self.eos}
            base_text = self.model.generate(input_ids=ids[:1], attention_mask=mask[:1], **kwargs)
            peft_text = wrapped.generate(input_ids=ids[:1], attention_mask=mask[:1], **kwargs)
            forward_next = wrapped(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1].argmax()
            out["peft_prefix_generate_equals_base_generate"] = bool(torch.equal(base_text, peft_text))
            out["peft_prefix_generate_first_token_matches_its_forward"] = bool(peft_text[0, ids.shape[1]] == forward_next)
        return out

    # --- ops per decoding step, and memory across layouts -------------------------------------------

    def ops(self, rows: int) -> None:
        """Top-level ops and time of one decoding step (after a prefill of the batch), against the base model's."""
        ids, mask = self.batch(rows, seed=2)
        with torch.inference_mode():
            base = decoder(slimtune.Bank(self.model), [None] * rows, ids, mask)
            base_ops = top_level_ops(base)
            for method in self.args.methods:
                bank, users = make_bank(self.model, rows, list(METHODS) if method == "mix" else [method])
                step = decoder(bank, users, ids, mask)
                ops = top_level_ops(step)
                _, s, ratio = paired(base, step, self.args.repeats * 4, self.device)
                self.record("decoding step", f"slimtune {method}, mixed batch", rows, rows, s, ratio,
                            ops=ops, base_ops=base_ops, ops_ratio=round(ops / base_ops, 3))
                bank.detach()

    def compiled(self, rows: int) -> None:
        """The compiled decoding step (`Engine(compile=...)`): each method's mixed batch against the base model
        compiled the same way, and the base model's compiled step against its eager one; with compile time, graph
        breaks and top-level aten ops (`top_level_ops`)."""
        backend = self.args.compile
        ids, mask = self.batch(rows, seed=2)
        # Each compiled step on a model of its own (the same weights): a server has one bank per model, and a
        # graph traced on a model that another bank's tunings then change (BitFit adds biases to its layers) fails
        # its guards, so two banks' compiled steps on one model would keep recompiling each other's graphs.
        with torch.inference_mode():
            eager = decoder(slimtune.Bank(self.model), [None] * rows, ids, mask)
            base, made = compiled_decoder(slimtune.Bank(copy.deepcopy(self.model), serving=True), [None] * rows, ids,
                                          mask, backend)
            base_ops = top_level_ops(base)
            _, s, ratio = paired(eager, base, self.args.repeats * 4, self.device)
            self.record("compiled step", f"base model compiled ({backend}) against eager", rows, rows, s, ratio,
                        compile_seconds=round(made.compile_seconds, 1), graphs=made.compiles,
                        graph_breaks=made.graph_breaks, ops=base_ops, eager_ops=top_level_ops(eager))
            for method in self.args.methods:
                bank, users = make_bank(copy.deepcopy(self.model), rows, list(METHODS) if method == "mix" else [method])
                step, made = compiled_decoder(bank, users, ids, mask, backend)
                ops = top_level_ops(step)
                _, s, ratio = paired(base, step, self.args.repeats * 4, self.device)
                self.record("compiled step", f"slimtune {method}, mixed batch, compiled ({backend})", rows, rows, s,
                            ratio, compile_seconds=round(made.compile_seconds, 1), graphs=made.compiles,
                            graph_breaks=made.graph_breaks, ops=ops, base_ops=base_ops,
                            ops_ratio=round(ops / base_ops, 3))
                bank.detach()

    def layouts(self, rows: int) -> None:
        ids, mask = self.batch(rows, seed=3)
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            bank, names = make_bank(self.model, 4 * rows, list(METHODS))
            before = extra_bytes(bank)
            for _ in range(24):
                users = [names[i] for i in torch.randperm(len(names), generator=g)[:rows].tolist()]
                bank(input_ids=ids, attention_mask=mask, users=users)
            row = {"section": "memory across layouts", "config": f"{4 * rows} tunings (mixed methods), 24 layouts of {rows}",
                   "rows": rows, "tuning_bytes": tuning_bytes(bank), "extra_bytes_before": before,
                   "extra_bytes_after": extra_bytes(bank)}
            self.results.append(row)
            print(json.dumps(row), flush=True)
            bank.detach()

    # --- stored tunings ----------------------------------------------------------------------------

    def scaling(self, rows: int) -> None:
        """Banks of `--stored` tunings of `--stored-methods` in turn (each table made with room for all of them, as an
        engine makes it for `max_resident`): a prefill and a decoding step of `rows` distinct users drawn from the
        bank, each as a ratio to the base model's, with the tables' bytes and the process's growth."""
        ids, mask = self.batch(rows)
        tokens = rows * self.args.length
        model = self.model
        kinds = self.args.stored_methods
        label = "mixed methods" if kinds == list(METHODS) else ", ".join(kinds)

        def base():
            return model(input_ids=ids, attention_mask=mask)

        g = torch.Generator().manual_seed(0)
        for count in self.args.stored:
            before = rss_bytes()
            began = time.perf_counter()
            bank, names = make_bank(model, count, kinds, slots=count)
            added = time.perf_counter() - began
            users = [names[i] for i in torch.randperm(count, generator=g)[:rows].tolist()]
            users += [users[r % len(users)] for r in range(len(users), rows)]  # fewer tunings than rows: repeat

            def mixed(b=bank, u=users):
                return b(input_ids=ids, attention_mask=mask, users=u)

            memory = bank.memory()
            config = f"bank of {count} tunings ({label}), {min(rows, count)} distinct users"
            with torch.inference_mode():
                _, s, ratio = paired(base, mixed, self.args.repeats, self.device)
                self.record("stored tunings", config, rows, tokens, s, ratio, stored=count,
                            tuning_bytes=tuning_bytes(bank), table_bytes=memory["tables"],
                            rss_growth_bytes=rss_bytes() - before, add_seconds=round(added, 1))
                base_step = decoder(slimtune.Bank(model), [None] * rows, ids, mask)
                step = decoder(bank, users, ids, mask)
                _, s, ratio = paired(base_step, step, self.args.repeats * 4, self.device)
                self.record("stored tunings, decoding step", config, rows, rows, s, ratio, stored=count,
                            rss_growth_bytes=rss_bytes() - before)
            del base_step, step, mixed
            bank.detach()
            del bank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (quick check of the script)")
    p.add_argument("--random", action="store_true", help="a SmolLM2-135M-shaped model with random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    p.add_argument("--length", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=16, help="generated tokens per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-rows", type=int, default=16, help="time the one-at-a-time loop up to this many rows")
    p.add_argument("--stored", type=int, nargs="+", default=[1, 16, 256, 1024])
    p.add_argument("--stored-methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="the methods of the stored tunings, in turn (default: all seven)")
    p.add_argument("--methods", nargs="+", default=[*METHODS, "mix"], choices=[*METHODS, "mix"])
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["forward", "generation", "peft", "scaling", "ops", "layouts", "compiled"])
    p.add_argument("--compile", default="inductor", help="torch.compile backend of the compiled section")
    p.add_argument("--out", default="bench/results/many_users.json")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.tiny:
        model, name = tiny_model(), "tiny random Llama"
    elif args.random:
        from transformers import LlamaForCausalLM

        model, name = LlamaForCausalLM(_smollm2_config()).eval(), "smollm2-135m-shaped (random weights)"
    else:
        from slimtune.models import load_model

        model, _ = load_model("smollm2-135m")
        name = "smollm2-135m"
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    bench = Bench(model, args)
    started = time.time()
    for rows in args.rows:
        if "forward" not in args.skip:
            bench.forward(rows)
        if "generation" not in args.skip:
            bench.generation(rows)
        if "peft" not in args.skip:
            bench.peft(rows)
        if "ops" not in args.skip:
            bench.ops(rows)
        if "layouts" not in args.skip:
            bench.layouts(rows)
        if "compiled" not in args.skip:
            bench.compiled(rows)
    if "scaling" not in args.skip:
        bench.scaling(args.rows[0])
    checks = bench.peft_correctness() if "peft" not in args.skip else {}
    print(json.dumps(checks), flush=True)
    meta = {"model": name, "device": args.device, "dtype": args.dtype, "length": args.length, "new_tokens": args.new,
            "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "seconds": round(time.time() - started),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": bench.results, "checks": checks}, indent=2) + "\n")


def _smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=2)


if __name__ == "__main__":
    main()
