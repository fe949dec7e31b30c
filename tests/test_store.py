"""The store: named tunings for one base model, changed atomically, safe under concurrent writers."""

import json
import multiprocessing
import os

import pytest
import torch

import slimtune
from slimtune.errors import ModelMismatchError, TuningError, TuningFileError, UnknownUserError

from conftest import build
from helpers import perturb


def saved(tmp_path, arch="gpt2", method=None, seed=0, name="t"):
    model = build(arch)
    tuned = slimtune.attach(model, method or slimtune.LoRA(rank=2))
    perturb(tuned.tuning_parameters(), seed=seed)
    return tuned.save(tmp_path / "saved" / f"{name}{seed}")


def test_add_list_entry_delete(tmp_path):
    store = slimtune.Store(tmp_path / "store", build("gpt2"))
    entry = store.add("alice", saved(tmp_path), task={"kind": "classification", "labels": ["a", "b"]})
    store.add("bob", saved(tmp_path, method=slimtune.PrefixTuning(length=3, reparam=None, init="random"), seed=1))
    assert store.names() == ["alice", "bob"] and len(store) == 2 and "alice" in store
    assert entry.kind == "lora" and entry.method["rank"] == 2 and entry.task["labels"] == ["a", "b"]
    assert entry.bytes == (entry.path / "tuning.safetensors").stat().st_size > 0
    assert entry.model["architecture"] == "GPT2LMHeadModel" and entry.created > 0
    assert [e.kind for e in store.list()] == ["lora", "prefix"]
    store.delete("alice")
    assert store.names() == ["bob"]
    with pytest.raises(UnknownUserError, match="alice"):
        store.delete("alice")
    with pytest.raises(UnknownUserError):
        store.path_of("alice")


def test_a_stored_tuning_loads_and_gives_the_saved_tunings_logits(tmp_path):
    model = build("llama")
    tuned = slimtune.attach(model, slimtune.PromptTuning(length=3, init="uniform"))
    perturb(tuned.tuning_parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = tuned(input_ids=ids).logits
    store = slimtune.Store(tmp_path / "store", model)
    store.add("carol", tuned)
    reopened = slimtune.Store(tmp_path / "store")  # another process would open it like this
    again = slimtune.load(build("llama"), reopened.path_of("carol"))
    torch.testing.assert_close(again(input_ids=ids).logits, expected, atol=0, rtol=0)


def snapshot(store):
    return sorted((p.relative_to(store.path).as_posix(), p.stat().st_size) for p in store.path.rglob("*") if p.is_file()
                  and p.name != ".lock")


def test_refused_tunings_leave_the_store_unchanged(tmp_path):
    store = slimtune.Store(tmp_path / "store", build("gpt2"))
    store.add("alice", saved(tmp_path))
    before = snapshot(store)
    # another architecture
    with pytest.raises(ModelMismatchError, match="llama"):
        store.add("bob", saved(tmp_path, arch="llama"))
    # the same architecture and size, other weights: another base model
    other = build("gpt2", seed=5)
    with pytest.raises(ModelMismatchError, match="another base model"):
        store.add("bob", slimtune.attach(other, slimtune.LoRA(rank=2)))
    # corrupt tensors, bad JSON, an unknown method
    broken = saved(tmp_path, seed=2)
    data = (broken / "tuning.safetensors").read_bytes()
    (broken / "tuning.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TuningFileError, match="corrupt or truncated"):
        store.add("bob", broken)
    bad_json = saved(tmp_path, seed=3)
    (bad_json / "slimtune.json").write_text("{not json")
    with pytest.raises(TuningFileError, match="not valid JSON"):
        store.add("bob", bad_json)
    unknown = saved(tmp_path, seed=4)
    record = json.loads((unknown / "slimtune.json").read_text())
    record["method"]["kind"] = "telepathy"
    (unknown / "slimtune.json").write_text(json.dumps(record))
    with pytest.raises(TuningError, match="telepathy"):
        store.add("bob", unknown)
    # a taken name, a bad name
    with pytest.raises(TuningError, match="already holds"):
        store.add("alice", saved(tmp_path, seed=6))
    for bad in ["", "../x", ".hidden", "a/b", "x" * 200]:
        with pytest.raises(TuningError, match="invalid tuning name"):
            store.add(bad, saved(tmp_path, seed=7))
    assert snapshot(store) == before
    assert not [p for p in store.path.rglob(".*") if p.name.startswith((".staging", ".trash"))]


def test_replace_swaps_the_whole_entry(tmp_path):
    store = slimtune.Store(tmp_path / "store", build("gpt2"))
    store.add("alice", saved(tmp_path, seed=0))
    store.add("alice", saved(tmp_path, method=slimtune.BitFit(), seed=1), replace=True)
    assert store.entry("alice").kind == "bitfit" and store.names() == ["alice"]


def test_a_store_is_for_one_base_model(tmp_path):
    slimtune.Store(tmp_path / "store", build("gpt2"))
    with pytest.raises(ModelMismatchError):
        slimtune.Store(tmp_path / "store", build("llama"))
    # A store opened without a model takes its base model from the first tuning added.
    free = slimtune.Store(tmp_path / "free")
    free.add("a", saved(tmp_path, arch="llama"))
    with pytest.raises(ModelMismatchError):
        free.add("b", saved(tmp_path, arch="gpt2"))


def _add_many(folder, source, prefix, count):
    store = slimtune.Store(folder)
    for i in range(count):
        store.add(f"{prefix}{i}", source)
        store.add("contested", source, replace=True)  # both processes write the same name too
        assert "contested" in store  # a replace never leaves the name missing, even for a moment
        store.entry("contested")


def test_two_processes_adding_at_once_never_corrupt_the_store(tmp_path):
    source = saved(tmp_path)
    slimtune.Store(tmp_path / "store", build("gpt2"))
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_many, args=(tmp_path / "store", source, p, 8)) for p in ("x", "y")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    store = slimtune.Store(tmp_path / "store")
    assert store.names() == sorted(["contested", *(f"{p}{i}" for p in "xy" for i in range(8))])
    model = build("gpt2")
    for name in store.names():  # every entry whole and loadable
        slimtune.load(model, store.path_of(name))
    assert not [p for p in store.path.rglob(".*") if p.name.startswith((".staging", ".trash"))]
    assert len(os.listdir(store.versions)) == len(store.names())  # replaced versions were removed
