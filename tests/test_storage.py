"""Saving and loading tunings: tiny files, exact reloads, and clear refusals of bad input."""

import json

import pytest
import torch

import slimtune
from slimtune import storage

from conftest import BUILDERS, VOCAB, build
from helpers import methods_for, padded_batch, perturb


def inputs_for(arch):
    ids, mask = padded_batch(arch, [6, 4, 5])
    extra = {"decoder_input_ids": ids[:, :3]} if arch == "t5" else {}
    return {"input_ids": ids, "attention_mask": mask, **extra}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_save_then_load_reproduces_logits_exactly(arch, tmp_path):
    inputs = inputs_for(arch)
    for i, (name, method) in enumerate([*methods_for(arch).items(), ("full", slimtune.FullFineTuning())]):
        tuned = slimtune.attach(build(arch), method)
        perturb(tuned.tuning_parameters(), seed=i, scale=0.05)
        tuned.eval()
        with torch.no_grad():
            want = tuned(**inputs).logits
        tuned.save(tmp_path / name)
        loaded = slimtune.load(build(arch), tmp_path / name)
        with torch.no_grad():
            got = loaded(**inputs).logits
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=name)
        assert loaded.method == method


def test_a_saved_tuning_holds_only_the_tuning(tmp_path):
    model = build("gpt2")
    base_names = set(model.state_dict())
    tuned = slimtune.attach(model, slimtune.PrefixTuning(length=4))  # the MLP is not saved
    path = tuned.save(tmp_path / "prefix")
    record, tensors = storage.read(path)
    assert all(name.endswith(".prefix") for name in tensors)
    assert not set(tensors) & base_names
    assert sum(t.numel() for t in tensors.values()) == 2 * 4 * 2 * 32  # layers * k * (key, value) * width
    on_disk = sum(f.stat().st_size for f in path.iterdir())
    report = slimtune.parameter_report(tuned)
    assert report.bytes_stored == on_disk
    assert report.trainable > sum(t.numel() for t in tensors.values())  # training-time MLP
    full = slimtune.attach(build("gpt2"), slimtune.FullFineTuning())
    assert slimtune.parameter_report(full).bytes_stored > 20 * report.bytes_stored
    assert record["method"]["kind"] == "prefix" and record["model"]["model_type"] == "gpt2"


def test_saving_is_atomic_and_overwrites(tmp_path):
    tuned = slimtune.attach(build("gpt2"), slimtune.LoRA(rank=2))
    tuned.save(tmp_path / "t")
    perturb(tuned.tuning_parameters())
    tuned.save(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["slimtune.json", "tuning.safetensors"]
    _, tensors = storage.read(tmp_path / "t")
    saved = tuned.bank.state("default")
    assert all(torch.equal(tensors[n], saved[n]) for n in saved)


def test_written_files_get_the_permissions_open_would_give(tmp_path):
    """The temporary file behind an atomic write is owner-only; the file it becomes must not be."""
    (tmp_path / "plain.json").write_bytes(b"{}")
    storage.atomic_write(tmp_path / "new.json", b"{}")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777
    (tmp_path / "old.json").write_bytes(b"[]")
    (tmp_path / "old.json").chmod(0o604)
    storage.atomic_write(tmp_path / "old.json", b"{}")  # an existing file keeps its own
    assert (tmp_path / "old.json").stat().st_mode & 0o777 == 0o604
    assert (tmp_path / "old.json").read_bytes() == b"{}"


def test_loading_into_a_model_of_another_shape_or_type_says_so(tmp_path):
    slimtune.attach(build("gpt2"), slimtune.LoRA(rank=2)).save(tmp_path / "gpt2")
    with pytest.raises(slimtune.ModelMismatchError, match="gpt2 model.*llama model"):
        slimtune.load(build("llama"), tmp_path / "gpt2")
    from transformers import GPT2Config, GPT2LMHeadModel

    wider = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4))
    with pytest.raises(slimtune.ModelMismatchError, match="hidden_size 32.*has 48"):
        slimtune.load(wider, tmp_path / "gpt2")


def test_a_tuning_for_another_head_is_refused(tmp_path):
    slimtune.attach(build("bert"), slimtune.LoRA(rank=2)).save(tmp_path / "bert")
    from transformers import BertConfig, BertForSequenceClassification

    config = build("bert").config
    config.num_labels = 5
    with pytest.raises(slimtune.ModelMismatchError, match="num_labels 3.*has 5"):
        slimtune.load(BertForSequenceClassification(BertConfig(**config.to_dict())), tmp_path / "bert")


def test_corrupt_or_truncated_files_are_refused(tmp_path):
    path = slimtune.attach(build("llama"), slimtune.PromptTuning(length=3)).save(tmp_path / "p")
    data = (path / "tuning.safetensors").read_bytes()
    (path / "tuning.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(slimtune.TuningFileError, match="corrupt or truncated"):
        slimtune.load(build("llama"), path)
    (path / "tuning.safetensors").write_bytes(data)
    (path / "slimtune.json").write_text('{"format": "slimtune-tuning", "vers')
    with pytest.raises(slimtune.TuningFileError, match="not valid JSON"):
        slimtune.load(build("llama"), path)
    with pytest.raises(slimtune.TuningFileError, match="expected the files"):
        slimtune.load(build("llama"), tmp_path / "nothing-here")


def test_tensors_that_do_not_fit_are_named(tmp_path):
    path = slimtune.attach(build("gpt2"), slimtune.Adapter(size=4)).save(tmp_path / "a")
    record = json.loads((path / "slimtune.json").read_text())
    record["method"]["size"] = 8  # the record now disagrees with the tensors
    (path / "slimtune.json").write_text(json.dumps(record))
    with pytest.raises(slimtune.ModelMismatchError, match=r"has shape \(4, 32\), this model needs \(8, 32\)"):
        slimtune.load(build("gpt2"), path)
    record["method"]["kind"] = "loha"
    (path / "slimtune.json").write_text(json.dumps(record))
    with pytest.raises(slimtune.TuningFileError, match="unknown tuning method 'loha'"):
        slimtune.load(build("gpt2"), path)


def test_a_bank_serves_saved_and_live_tunings(tmp_path):
    alice = slimtune.attach(build("gpt2"), slimtune.PrefixTuning(length=3))
    perturb(alice.tuning_parameters())
    alice.save(tmp_path / "alice")
    bob = slimtune.attach(build("gpt2"), slimtune.LoRA(rank=2))
    perturb(bob.tuning_parameters(), seed=1)
    bank = slimtune.Bank(build("gpt2"))
    bank.add("alice", tmp_path / "alice")
    bank.add("bob", bob)
    ids, mask = padded_batch("gpt2", [5, 5, 5])
    with torch.no_grad():
        out = bank(input_ids=ids, attention_mask=mask, users=["alice", "bob", None]).logits
        torch.testing.assert_close(out[0], alice(input_ids=ids[:1]).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], bob(input_ids=ids[1:2]).logits[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(slimtune.TuningError, match="expected a method config"):
        bank.add("carol", 42)
