"""Slot tables under churn: a server's tables, and the compiled step's graphs over them, stay as they are while
tunings come and go. A shape whose last tuning leaves keeps its table for the next one, a table made with room
for the engine's resident tunings is never reallocated, and DoRA's gains are computed when a tuning is added,
not by the serving steps; every row still gets what it gets alone."""

import random

import pytest
import torch

import slimtune
from slimtune.engine import Engine
from slimtune.methods.dora import DoRATuning
from slimtune.serving.capture import _Routing

from conftest import build
from helpers import methods_for, padded_batch, perturb, vocab_tokenizer


def tensors_of(table) -> list[int]:
    """Where each of the table's tensors lives: the same after a change means nothing was reallocated."""
    derived = [t for t, *_ in getattr(table, "derived", {}).values()]
    return [t.data_ptr() for t in [table.values, *(t for ts in table.tensors.values() for t in ts), *derived]]


def saved_tunings(users: dict) -> dict:
    """Each user's tuning with non-trivial values, as (method, tensors): what a store gives an engine."""
    source = slimtune.Bank(build("llama"))
    for i, (user, method) in enumerate(users.items()):
        source.add(user, method)
        perturb(source.user_parameters(user), seed=i, scale=0.3 if method.kind in ("dora", "ia3") else 0.2)
    return {user: (source.method(user), source.state(user)) for user in users}


def alone(bank, ids, mask, users):
    return torch.cat([bank(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], users=[u]).logits
                      for b, u in enumerate(users)])


def test_a_shape_whose_last_tuning_leaves_keeps_its_table_and_the_compiled_steps_structure():
    saved = saved_tunings({"a": slimtune.LoRA(rank=4), "b": slimtune.LoRA(rank=8), "c": slimtune.Adapter(size=8),
                           "d": slimtune.LoRA(rank=8, alpha=4), "e": slimtune.LoRA(rank=4, alpha=2)})
    bank = slimtune.Bank(build("llama"), serving=True)
    for user in "abc":
        bank.add(user, saved[user])
    part = bank.parts["lora"]
    structure = _Routing.structure(bank)  # what the compiled step keeps one graph per (`serving.capture`)
    table = part.tables[(8, 0.0)]
    where = tensors_of(table)

    bank.remove("b")  # rank 8's only tuning: its table is kept, empty
    bank.add("d", saved["d"])  # the next rank-8 tuning gets it back as it was
    assert part.tables[(8, 0.0)] is table and tensors_of(table) == where
    assert _Routing.structure(bank) == structure
    bank.remove("d")
    assert (8, 0.0) not in part.tables and part.idle[(8, 0.0)] is table
    assert bank.memory()["idle"] == table.nbytes > 0  # an empty table's bytes are counted, apart from the others
    bank.add("d", saved["d"])
    assert bank.memory()["idle"] == 0 and _Routing.structure(bank) == structure

    bank.remove("a")  # the first table made empties and fills again: the tables keep their order
    bank.add("e", saved["e"])
    assert _Routing.structure(bank) == structure
    ids, mask = padded_batch("llama", [5, 4, 3, 5])
    with torch.no_grad():
        out = bank(input_ids=ids, attention_mask=mask, users=["d", "e", "c", None]).logits
        torch.testing.assert_close(out, alone(bank, ids, mask, ["d", "e", "c", None]), atol=1e-5, rtol=1e-4)


def test_idle_tables_beyond_the_budget_are_freed_longest_idle_first_and_a_move_frees_them_all():
    bank = slimtune.Bank(build("llama"), serving=True)
    for user, rank in [("r2", 2), ("r4", 4), ("r8", 8)]:
        bank.add(user, slimtune.LoRA(rank=rank))
    part = bank.parts["lora"]
    sizes = {rank: part.tables[(rank, 0.0)].nbytes for rank in (2, 4, 8)}
    part.keep_idle_bytes = sizes[4] + sizes[8]
    for user in ("r2", "r4", "r8"):
        bank.remove(user)
    assert list(part.idle) == [(4, 0.0), (8, 0.0)]  # rank 2's table, idle longest, went over the budget
    assert bank.memory()["idle"] == sizes[4] + sizes[8] and bank.memory()["tables"] == 0
    bank.to(torch.float64)
    assert not part.idle and bank.memory()["idle"] == 0


def test_a_table_made_with_room_for_n_tunings_is_never_reallocated_while_it_holds_at_most_n():
    bank = slimtune.Bank(build("llama"), serving=True, slots=6)
    bank.add("u0", slimtune.LoRA(rank=4))
    table = bank.parts["lora"].tables[(4, 0.0)]
    where, structure = tensors_of(table), _Routing.structure(bank)
    assert table.capacity == 6
    for i in range(1, 6):
        bank.add(f"u{i}", slimtune.LoRA(rank=4))
        if i % 2:  # churn within the table: slots freed and reused
            bank.remove(f"u{i - 1}")
        assert tensors_of(table) == where and _Routing.structure(bank) == structure
    for i in range(6, 12):
        bank.add(f"u{i}", slimtune.LoRA(rank=4))
    assert table.capacity >= len(table.slots) > 6  # beyond its room it grows as before

    engine = Engine(build("llama"), vocab_tokenizer(), max_resident=5, max_batch=4)
    engine.add("a", slimtune.LoRA(rank=4))
    assert engine.bank.parts["lora"].tables[(4, 0.0)].capacity == 5  # the most it holds from its store, pinned aside
    engine.close()


def test_dora_gains_are_computed_when_a_tuning_is_added_not_by_the_serving_steps(monkeypatch):
    saved = saved_tunings({"qv": slimtune.DoRA(rank=4), "qk": slimtune.DoRA(rank=4, targets=["q_proj", "k_proj"])})
    bank = slimtune.Bank(build("llama"), serving=True)
    for user in saved:
        bank.add(user, saved[user])
    table = bank.parts["dora"].tables[(4, 0.0)]
    sites = set(bank.parts["dora"].tuning("qv").names) | set(bank.parts["dora"].tuning("qk").names)
    assert set(table.derived) == {("gain", name) for name in sites}
    where = tensors_of(table)
    calls = []
    monkeypatch.setattr(DoRATuning, "gain", lambda *args: calls.append(args) or pytest.fail("a gain computed"))
    ids, mask = padded_batch("llama", [5, 4, 3])
    with torch.no_grad():
        bank(input_ids=ids, attention_mask=mask, users=["qv", "qk", None])
    assert not calls and tensors_of(table) == where


def test_after_much_churn_every_row_gets_what_it_gets_alone():
    """Tunings of every method leave and come back in other slots, shapes empty and fill again (DoRA users with
    other layers take each other's slots): a mixed batch still gives each row what it gives it alone, and what a
    bank that never churned gives it, and no table was made anew or reallocated."""
    users = methods_for("llama") | {"dora": slimtune.DoRA(rank=4), "dora-qk": slimtune.DoRA(rank=4, targets=["q_proj", "k_proj"]),
                                     "ia3": slimtune.IA3(), "lora8": slimtune.LoRA(rank=8)}
    saved = saved_tunings(users)
    reference = slimtune.Bank(build("llama"))
    for user in users:
        reference.add(user, saved[user])
    bank = slimtune.Bank(build("llama"), serving=True)  # tables of 4 slots: at most 4 tunings of each shape here
    for user in users:
        bank.add(user, saved[user])
    tables = {(part.kind, group): (table, tensors_of(table)) for part in bank.parts.values()
              for group, table in part.tables.items()}
    structure = _Routing.structure(bank)
    rng = random.Random(0)
    ids, mask = padded_batch("llama", [5, 4, 5, 3, 5, 2])
    names = list(users)
    for _ in range(6):
        for user in rng.sample(names, 6):  # out, then back (in another slot, maybe): groups empty and fill again
            bank.remove(user)
        for user in rng.sample(names, len(names)):
            if user not in bank.users:
                bank.add(user, saved[user])
        rows = [rng.choice([*names, None]) for _ in range(6)]
        with torch.no_grad():
            out = bank(input_ids=ids, attention_mask=mask, users=rows).logits
            torch.testing.assert_close(out, alone(bank, ids, mask, rows), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out, reference(input_ids=ids, attention_mask=mask, users=rows).logits,
                                       atol=1e-5, rtol=1e-4)
    for (kind, group), (table, where) in tables.items():
        assert bank.parts[kind].tables[group] is table and tensors_of(table) == where, (kind, group)
    assert _Routing.structure(bank) == structure


def test_dora_gains_follow_a_merge_of_another_dora_tuning():
    saved = saved_tunings({"a": slimtune.DoRA(rank=4), "b": slimtune.DoRA(rank=4, alpha=8)})
    banks = [slimtune.Bank(build("llama"), serving=serving) for serving in (True, False)]
    ids, mask = padded_batch("llama", [5, 4])
    with torch.no_grad():
        for bank in banks:
            for user in saved:
                bank.add(user, saved[user])
            bank(input_ids=ids, attention_mask=mask, users=["a", "b"])  # gains used once before the merge
            bank.parts["dora"].merge("a")
        served, plain = (bank(input_ids=ids, attention_mask=mask, users=["b", "a"]).logits for bank in banks)
    torch.testing.assert_close(served, plain, atol=1e-5, rtol=1e-4)


# --- the compiled step: no graph made for a needless reason -----------------------------------------

def prompt(j: int) -> list[int]:
    return [(7 * j + k) % 90 + 3 for k in range(3 + j % 5)]


def run(engine, users):
    handles = [engine.stream(u, prompt(j), max_new_tokens=4, keep_logits=True) for j, u in enumerate(users)]
    return [h.result() for h in handles]


def compiled_engine(**options) -> Engine:
    engine = Engine(build("llama"), vocab_tokenizer(), max_batch=8, compile="aot_eager", **options)
    engine._captured.background = False  # every step waits for its graph: each one made is counted
    return engine


def same(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def test_new_dora_tunings_and_a_filling_table_make_no_new_graph():
    # DoRA's gains were made by the steps (a Python set of the slots done, which the graph guarded on: every new
    # DoRA tuning recompiled it), and a table grew, hence made a new structure, at its 5th, 9th, ... tuning.
    saved = saved_tunings({f"d{i}": slimtune.DoRA(rank=4) for i in range(4)} | {f"l{i}": slimtune.LoRA(rank=4) for i in range(6)})
    compiled, eager = compiled_engine(max_resident=16), Engine(build("llama"), vocab_tokenizer(), max_batch=8)
    for engine in (compiled, eager):
        engine.add("d0", saved["d0"])
        engine.add("l0", saved["l0"])
    same(run(compiled, ["d0", "l0"]), run(eager, ["d0", "l0"]))
    graphs = compiled.stats.compiles
    for step, users in enumerate([["d1", "l1", "l2"], ["d2", "l3"], ["d3", "l4", "l5"]]):
        for engine in (compiled, eager):
            for user in users:
                engine.add(user, saved[user])
            if step == 1:
                engine.remove("d1")  # a slot freed, then taken by the next DoRA tuning
        rows = [*users, "d0", "l0"]
        same(run(compiled, rows), run(eager, rows))
    assert compiled.stats.compiles == graphs
    assert compiled.stats.compiled_steps == compiled.stats.steps
    compiled.close()
    eager.close()


def test_the_graph_outlives_the_tuning_it_was_traced_with_and_a_table_that_empties_and_fills():
    # The compiled step read a table's settings (LoRA's dropout, an adapter's activation) through one of its users,
    # so its graph guarded on that user: under LRU churn the oldest user, the one traced with, is the first to go,
    # and every eviction recompiled. And a table that emptied and filled again (the same structure as before)
    # was compiled anew, its graph having been let go when the structure changed.
    saved = saved_tunings({"a": slimtune.LoRA(rank=4), "b": slimtune.LoRA(rank=4), "c": slimtune.LoRA(rank=4),
                           "x": slimtune.Adapter(size=8), "y": slimtune.Adapter(size=8), "z": slimtune.Adapter(size=8),
                           "r8": slimtune.LoRA(rank=8)})
    compiled, eager = compiled_engine(max_resident=16), Engine(build("llama"), vocab_tokenizer(), max_batch=8)
    for engine in (compiled, eager):
        for user in "abxyz":
            engine.add(user, saved[user])
        engine.add("r8", saved["r8"])
    rows = ["a", "b", "x", "y", "r8"]
    same(run(compiled, rows), run(eager, rows))
    graphs = compiled.stats.compiles
    for engine in (compiled, eager):
        engine.remove("a")  # each table's first user: the graph was traced with them
        engine.remove("x")
        engine.add("c", saved["c"])
    rows = ["b", "c", "y", "z", "r8"]
    same(run(compiled, rows), run(eager, rows))
    assert compiled.stats.compiles == graphs

    for engine in (compiled, eager):
        engine.remove("r8")  # rank 8's table empties: a structure of its own, compiled once
    same(run(compiled, ["b", "y"]), run(eager, ["b", "y"]))
    graphs = compiled.stats.compiles
    for engine in (compiled, eager):
        engine.add("r8", saved["r8"])  # and fills again: the structure before, whose graph is still there
    rows = ["b", "c", "y", "z", "r8"]
    same(run(compiled, rows), run(eager, rows))
    assert compiled.stats.compiles == graphs
    assert compiled.stats.compiled_steps == compiled.stats.steps
    compiled.close()
    eager.close()
