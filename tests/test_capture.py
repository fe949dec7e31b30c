"""The compiled decoding step (`Engine(compile=...)`): one graph for a continuously batched mix of every
method, each row getting what the eager step gives it. The graph is captured with the "aot_eager" backend
(what inductor compiles, without generating code: seconds, not minutes, on a test machine)."""

import pytest
import torch

import slimtune
from slimtune.engine import Engine
from slimtune.methods.prefix import PrefixComponent

from conftest import build
from helpers import methods_for, perturb, vocab_tokenizer


def engine_for(arch, **options):
    torch.manual_seed(0)
    engine = Engine(build(arch), vocab_tokenizer(), max_batch=8, **options)
    tunings = dict(methods_for(arch), dora=slimtune.DoRA(rank=4), ia3=slimtune.IA3())
    for i, (user, method) in enumerate(tunings.items()):
        engine.add(user, method)
        perturb(engine.bank.user_parameters(user), seed=i)
    return engine, [None, *tunings]


def prompt(j: int) -> list[int]:
    return [(7 * j + k) % 90 + 3 for k in range(3 + j % 5)]


def run(engine, users):
    options = [{"max_new_tokens": 3 + j % 4, "keep_logits": True} for j in range(len(users))]
    handles = [engine.stream(u, prompt(j), **options[j]) for j, u in enumerate(users)]
    return [h.result() for h in handles]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding-window layers beside full ones
def test_a_compiled_step_gives_each_row_of_a_changing_mix_what_the_eager_step_gives(arch):
    compiled, users = engine_for(arch, compile="aot_eager")
    eager, _ = engine_for(arch)
    got, want = run(compiled, users), run(eager, users)
    for user, a, b in zip(users, got, want, strict=True):
        assert a.token_ids == b.token_ids, user
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    stats = compiled.stats
    rows = list(stats.batch_rows)
    assert any(b != a for a, b in zip(rows, rows[1:], strict=False))  # rows joined and left between steps
    assert stats.compiled_steps == stats.steps > 0  # every step ran compiled
    assert stats.graph_breaks == 0
    # Layouts changed at every join and leave; graphs are made per cache size only (8 slots; 64, 128 columns).
    assert 1 <= stats.compiles <= 2
    compiled.close()
    eager.close()


def test_decoding_steps_run_prefix_rows_from_the_cache_with_no_prefix_work(monkeypatch):
    engine, _ = engine_for("llama")
    calls = []
    original = PrefixComponent.batch_prefix

    def counted(self, module, routing, batch):
        calls.append(routing)
        return original(self, module, routing, batch)

    monkeypatch.setattr(PrefixComponent, "batch_prefix", counted)
    alone = engine.generate("prefix5", prompt(1), max_new_tokens=6)
    assert len(calls) and engine.stats.steps == 5
    prefill = calls[0]
    assert all(routing is prefill for routing in calls)  # the prefix was read at prefill only
    reference = engine.bank.generate(input_ids=torch.tensor([prompt(1)]), users=["prefix5"], do_sample=False,
                                     max_new_tokens=6, pad_token_id=1)[0, len(prompt(1)):].tolist()
    assert alone.token_ids == reference[: reference.index(1)] if 1 in reference else reference
    engine.close()


def test_a_step_compiled_before_a_tuning_was_added_is_not_reused_without_its_hooks():
    # torch.compile does not guard on module hooks: a graph traced for the bare model would run LoRA rows as base rows
    model = build("llama")

    def tuned(engine):
        torch.manual_seed(3)
        engine.add("lora", slimtune.LoRA(rank=4))
        perturb(engine.bank.user_parameters("lora"), seed=3, scale=1.0)
        out = engine.generate("lora", prompt(2), max_new_tokens=3, keep_logits=True)
        engine.close()  # its hooks off the shared model
        return out

    compiled = Engine(model, vocab_tokenizer(), compile="aot_eager")
    compiled.generate(None, prompt(2), max_new_tokens=3)  # compiles the bare model's step
    got = tuned(compiled)
    want = tuned(Engine(model, vocab_tokenizer()))
    assert compiled.stats.compiles == 2 and compiled.stats.compiled_steps == 4
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
