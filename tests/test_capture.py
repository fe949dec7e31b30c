"""The compiled decoding step (`Engine(compile=...)`): one graph for a continuously batched mix of every
method, each row getting what the eager step gives it, compiled beside the running rows rather than in their
way. The graph is captured with the "aot_eager" backend (what inductor compiles, without generating code:
seconds, not minutes, on a test machine)."""

import threading

import pytest
import torch

import slimtune
from slimtune.engine import Engine
from slimtune.methods.prefix import PrefixComponent

from conftest import build
from helpers import methods_for, perturb, vocab_tokenizer


def engine_for(arch, attention="sdpa", **options):
    torch.manual_seed(0)
    model = build(arch)
    model.set_attn_implementation(attention)
    engine = Engine(model, vocab_tokenizer(), max_batch=8, **options)
    tunings = dict(methods_for(arch), dora=slimtune.DoRA(rank=4), ia3=slimtune.IA3())
    for i, (user, method) in enumerate(tunings.items()):
        engine.add(user, method)
        perturb(engine.bank.user_parameters(user), seed=i)
    return engine, [None, *tunings]


def waiting(engine: Engine) -> Engine:
    """`engine` with each new batch shape's first step waiting for its graph (as `bench/` runs the step), not
    running eagerly while it compiles: every step then runs compiled."""
    engine._captured.background = False
    return engine


HELD = threading.Event()  # a test clears it: compiles with the "slimtune_test_held" backend wait until it is set
HELD.set()


def held(graph, example_inputs):
    """A torch.compile backend that runs dynamo's graph as it is, once `HELD` is set: a compile as slow as the
    test wants."""
    HELD.wait()
    return graph.forward


torch._dynamo.register_backend(held, name="slimtune_test_held")


def prompt(j: int) -> list[int]:
    return [(7 * j + k) % 90 + 3 for k in range(3 + j % 5)]


def run(engine, users):
    options = [{"max_new_tokens": 3 + j % 4, "keep_logits": True} for j in range(len(users))]
    handles = [engine.stream(u, prompt(j), **options[j]) for j, u in enumerate(users)]
    return [h.result() for h in handles]


# gemma3: sliding-window layers beside full ones, and eager attention (which adds the mask to the scores)
@pytest.mark.parametrize(("arch", "attention"), [("llama", "sdpa"), ("gemma3", "eager")])
def test_a_compiled_step_gives_each_row_of_a_changing_mix_what_the_eager_step_gives(arch, attention):
    compiled, users = engine_for(arch, attention, compile="aot_eager")
    waiting(compiled)
    eager, _ = engine_for(arch, attention)
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


def test_a_first_tuning_compiles_beside_the_running_rows_which_go_on_eagerly_until_its_graph_is_ready():
    # A step whose structure had no graph used to compile on the engine's thread: minutes with inductor, while
    # every row of every tenant waited, e.g. for a tenant who uploaded the server's first LoRA tuning.
    def add_lora(engine):
        torch.manual_seed(3)
        engine.add("lora", slimtune.LoRA(rank=4))
        perturb(engine.bank.user_parameters("lora"), seed=3, scale=1.0)

    def long_rows(engine):
        return [engine.stream(None, prompt(j), max_new_tokens=12, keep_logits=True) for j in range(2)]

    def same(got, want):
        for a, b in zip(got, want, strict=True):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)

    compiled = waiting(Engine(build("llama"), vocab_tokenizer(), max_batch=8, compile="slimtune_test_held"))
    eager = Engine(build("llama"), vocab_tokenizer(), max_batch=8)
    same(run(compiled, [None, None]), run(eager, [None, None]))
    assert compiled.stats.compiled_steps == compiled.stats.steps > 0  # the bare model's graph is in use
    compiled._captured.background = True
    HELD.clear()
    timeout = threading.Timer(30, HELD.set)  # an engine that waits for the compile gets on, to fail below
    timeout.start()
    try:
        running = long_rows(compiled)
        add_lora(compiled)  # a slot table and hooks: a new structure, whose compile is held
        got = run(compiled, [None, "lora", None]) + [handle.result() for handle in running]
        finished_while_held = not HELD.is_set()
    finally:
        timeout.cancel()
        HELD.set()
    assert finished_while_held
    running = long_rows(eager)
    add_lora(eager)
    # As the eager engine gives them: the bare model's graph ran no LoRA row (torch.compile does not guard on hooks).
    same(got, run(eager, [None, "lora", None]) + [handle.result() for handle in running])
    stats = compiled.stats
    assert stats.eager_steps_while_compiling > 0

    assert compiled._captured.wait(timeout=60)
    steps, compiled_steps = stats.steps, stats.compiled_steps
    same(run(compiled, [None, "lora", None]), run(eager, [None, "lora", None]))
    assert stats.compiled_steps - compiled_steps == stats.steps - steps > 0  # the new structure's graph, once made
    assert stats.compiles == 2 and stats.graph_breaks == 0
    compiled.close()
    eager.close()
