"""Slot tables: resident tunings live in preallocated [slots, ...] tensors that inference gathers from by row."""

import pytest
import torch

import slimtune

from conftest import build
from helpers import bitfit_for, padded_batch, perturb

SITE_METHODS = {
    "lora": slimtune.LoRA(rank=4),
    "lora-alpha": slimtune.LoRA(rank=4, alpha=4),  # same table as "lora", another scale
    "adapter": slimtune.Adapter(size=8),
    "bitfit": bitfit_for("llama"),
    "ia3": slimtune.IA3(),
    "dora": slimtune.DoRA(rank=4),
    "prefix3": slimtune.PrefixTuning(length=3, reparam=None, init="random"),  # one table per prefix length
    "prefix5": slimtune.PrefixTuning(length=5, reparam=None, init="random"),
}


def site_bank(users: dict, serving: bool = False) -> slimtune.Bank:
    bank = slimtune.Bank(build("llama"), serving=serving)
    for i, (user, method) in enumerate(users.items()):
        bank.add(user, method)
        perturb(bank.user_parameters(user), seed=i, scale=0.2)
    return bank


def alone(bank, ids, mask, users):
    return torch.cat([bank(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], users=[u]).logits
                      for b, u in enumerate(users)])


@pytest.mark.parametrize("serving", [False, True])
def test_memory_does_not_grow_with_the_batch_layouts_seen(serving):
    """Many different mixes of users cost nothing beyond the tables (and, in a serving bank, the last layout's
    gathered parameters): no per-layout copies pile up."""
    bank = site_bank(SITE_METHODS, serving)
    g = torch.Generator().manual_seed(0)
    names = [*SITE_METHODS, None]
    ids, mask = padded_batch("llama", [5, 4, 5, 3, 5, 2])
    seen = []
    with torch.no_grad():
        for _ in range(12):
            users = [names[i] for i in torch.randint(len(names), (6,), generator=g).tolist()]
            out = bank(input_ids=ids, attention_mask=mask, users=users).logits
            torch.testing.assert_close(out, alone(bank, ids, mask, users), atol=1e-5, rtol=1e-4)
            seen.append(bank.memory())
    assert len({m["tables"] for m in seen}) == 1 and seen[0]["tables"] > 0
    per_slot = [sum(t.numel() * t.element_size() for ts in table.tensors.values() for t in ts) // (table.capacity + 1)
                for part in bank.parts.values() for table in part.tables.values()]
    assert all(m["layout"] <= 2 * 6 * sum(per_slot) for m in seen)  # the last layout's 6 rows (own rows, and all)
    bounded = ("lora", "adapter", "bitfit", "ia3", "prefix") + (("dora",) if serving else ())
    assert all(part._kept_bytes == 0 for part in bank.parts.values() if part.kind in bounded)
    assert serving or all(m["layout"] == 0 for m in seen)


def test_the_tables_hold_each_users_parameters_and_a_null_slot():
    bank = site_bank({"a": slimtune.LoRA(rank=4), "b": slimtune.LoRA(rank=4, alpha=8), "c": slimtune.LoRA(rank=2)})
    part = bank.parts["lora"]
    assert len(part.tables) == 2  # one table per rank; the scale is a number per slot
    table = part.tables[(4, 0.0)]
    for user in ("a", "b"):
        tuning = part.tuning(user)
        for name in tuning.names:
            a, b = table.tensors[name]
            assert torch.equal(a[table.slots[user]], tuning.A[name.replace(".", "__")])
            assert a[0].abs().sum() == 0 and b[0].abs().sum() == 0  # slot 0 changes nothing
    assert table.values[table.slots["b"], 0] == 2.0 and table.values[table.slots["a"], 0] == 4.0


def test_a_freed_slot_is_reused_and_a_removed_tuning_keeps_its_values():
    bank = site_bank({f"u{i}": slimtune.LoRA(rank=4) for i in range(5)})
    table = bank.parts["lora"].tables[(4, 0.0)]
    capacity, nbytes = table.capacity, table.nbytes
    params = bank.parts["lora"].tuning("u1").saved()  # name -> the parameter itself
    saved = {k: p.detach().clone() for k, p in params.items()}
    slot = table.slots["u1"]
    bank.remove("u1")
    bank.add("new", slimtune.LoRA(rank=4))
    perturb(bank.user_parameters("new"), seed=9, scale=0.5)
    assert table.slots["new"] == slot and (table.capacity, table.nbytes) == (capacity, nbytes)
    # The removed tuning's parameters no longer share the slot the new user writes.
    assert all(torch.equal(params[k].detach(), v) for k, v in saved.items())


def test_an_optimizer_step_is_seen_by_inference_without_any_bookkeeping():
    """The parameters are views of their slots: a training step changes what the tables hold."""
    bank = site_bank({"lora": slimtune.LoRA(rank=4), "adapter": slimtune.Adapter(size=8), "ia3": slimtune.IA3()})
    users = ["lora", "adapter", "ia3", None]
    ids, mask = padded_batch("llama", [5, 4, 5, 3])
    params = [p for u in ("lora", "adapter", "ia3") for p in bank.user_parameters(u)]
    with torch.no_grad():
        first = bank(input_ids=ids, attention_mask=mask, users=users).logits
    optimizer = torch.optim.AdamW(params, lr=0.05)
    bank(input_ids=ids, attention_mask=mask, users=users).logits.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        served = bank(input_ids=ids, attention_mask=mask, users=users).logits
    trained = bank(input_ids=ids, attention_mask=mask, users=users).logits.detach()  # through the parameters
    torch.testing.assert_close(served, trained, atol=1e-5, rtol=1e-4)
    assert (served[:3] - first[:3]).abs().max() > 1e-3
    torch.testing.assert_close(served[3], first[3], atol=0, rtol=0)  # the base row is untouched


@pytest.mark.parametrize("grow", [3, 9])
def test_tables_grow_and_follow_a_move_to_another_dtype(grow):
    users = {f"u{i}": slimtune.Adapter(size=8) for i in range(grow)}
    bank = site_bank(users)
    bank.to(torch.float64)
    table = bank.parts["adapter"].tables[(8, "relu")]
    assert table.capacity >= grow and all(t.dtype == torch.float64 for ts in table.tensors.values() for t in ts)
    ids, mask = padded_batch("llama", [4] * grow)
    with torch.no_grad():
        served = bank(input_ids=ids, attention_mask=mask, users=list(users)).logits
    torch.testing.assert_close(served, bank(input_ids=ids, attention_mask=mask, users=list(users)).logits.detach(),
                               atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(served, alone(bank, ids, mask, list(users)).detach(), atol=1e-10, rtol=1e-10)


def test_tunings_loaded_in_inference_mode_and_after_it_share_one_table():
    """An engine loads tunings in inference mode; a bank may later add one outside it."""
    source = site_bank({"a": slimtune.LoRA(rank=4), "b": slimtune.LoRA(rank=4)})
    saved = {u: (source.method(u), source.state(u)) for u in ("a", "b")}
    bank = slimtune.Bank(build("llama"))
    with torch.inference_mode():
        bank.add("a", saved["a"])
    bank.add("b", saved["b"])
    with torch.inference_mode():
        bank.remove("a")
        bank.add("a", saved["a"])
    ids, mask = padded_batch("llama", [5, 4])
    with torch.no_grad():
        torch.testing.assert_close(bank(input_ids=ids, attention_mask=mask, users=["a", "b"]).logits,
                                   source(input_ids=ids, attention_mask=mask, users=["a", "b"]).logits, atol=1e-6, rtol=1e-5)


def test_a_serving_bank_keeps_one_layouts_gathered_parameters_and_follows_adds_and_removes():
    """An engine's bank keeps what the last batch layout gathered (decoding steps reuse it); a new layout replaces
    it, and adding or removing a tuning makes it stale."""
    users = {"a": slimtune.LoRA(rank=4), "b": slimtune.LoRA(rank=4, alpha=32), "c": slimtune.Adapter(size=8)}
    plain = site_bank(users)
    serving = slimtune.Bank(build("llama"), serving=True)
    for user in users:
        serving.add(user, (plain.method(user), plain.state(user)))
    ids, mask = padded_batch("llama", [5, 4, 5, 3])
    table = serving.parts["lora"].tables[(4, 0.0)]
    with torch.no_grad():
        for rows in (["a", "b", None, "c"], ["a", "b", None, "c"], ["b", "a", "c", None]):
            torch.testing.assert_close(serving(input_ids=ids, attention_mask=mask, users=rows).logits,
                                       plain(input_ids=ids, attention_mask=mask, users=rows).logits, atol=1e-6, rtol=1e-5)
            assert table.kept_bytes > 0
        per_slot = sum(t.numel() * t.element_size() for ts in table.tensors.values() for t in ts) // (table.capacity + 1)
        assert table.kept_bytes == 2 * per_slot  # the last layout's 2 LoRA rows, not one copy per layout seen
        serving.remove("b")
        serving.add("b", (plain.method("a"), plain.state("a")))  # same slot, other values: nothing stale is used
        rows = ["b", "a", "c", None]
        out = serving(input_ids=ids, attention_mask=mask, users=rows).logits
        torch.testing.assert_close(out[0], plain(input_ids=ids, attention_mask=mask, users=["a"] * 4).logits[0],
                                   atol=1e-6, rtol=1e-5)
