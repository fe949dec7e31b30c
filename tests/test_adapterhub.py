"""AdapterHub folders, checked against the real `adapters` 1.3 package.

The folders and the reference outputs under fixtures/adapterhub/ were made by `adapters` itself
(make_adapterhub_fixtures.py, in an environment with transformers 4.57); these tests need only those files.
"""

import json
import shutil

import pytest
import torch
from make_adapterhub_fixtures import HERE, TRAIN_SEED, base_model, batch, outputs
from safetensors.torch import load_file

import slimtune
from slimtune.errors import ModelMismatchError, TuningError, TuningFileError

from helpers import perturb

REFERENCE = load_file(str(HERE / "reference.safetensors"))
FOLDERS = {
    "bert-mlm/houlsby": "houlsby",
    "bert-mlm/houlsby-gelu": "houlsby",
    "bert-mlm/houlsby-string": "houlsby",
    "bert-mlm/pfeiffer": "pfeiffer",
    "bert-mlm/pfeiffer-string": "pfeiffer",
    "bert-mlm/pfeiffer-leave-out": "pfeiffer",
    "bert-mlm/ffn-houlsby": "houlsby-ffn",
    "bert-cls/houlsby": "houlsby",
    "bert-cls/pfeiffer": "pfeiffer",
    "gpt2/houlsby": "houlsby",
    "gpt2/pfeiffer": "pfeiffer",
    "llama/houlsby": "houlsby",
    "llama/pfeiffer": "pfeiffer",
    "bert-mlm/lora": "lora",
    "llama/lora": "lora",
}
TOLERANCE = 1e-5


def gap(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    """The largest difference over the real (unpadded) positions."""
    return (got[mask.bool()] - want[mask.bool()]).abs().max().item()


def hidden(model, inputs, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True, **extra).hidden_states[-1]


@pytest.mark.parametrize("kind", ["bert-mlm", "bert-cls", "gpt2", "llama"])
def test_the_base_models_are_the_ones_the_references_were_made_on(kind):
    inputs = batch(kind)
    with torch.no_grad():
        got = outputs(base_model(kind), inputs)["hidden"]
    assert gap(got, REFERENCE[f"{kind}.base.hidden"], inputs["attention_mask"]) < TOLERANCE


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_an_adapterhub_folder_gives_adapterhubs_outputs(folder):
    kind = folder.split("/")[0]
    inputs = batch(kind)
    tuned = slimtune.load(base_model(kind), HERE / folder)
    method = tuned.method
    assert (method.kind if FOLDERS[folder] == "lora" else method.placement) == FOLDERS[folder]
    with torch.no_grad():
        out = tuned(**inputs, output_hidden_states=True)
    want = REFERENCE[f"{folder}.hidden"]
    assert gap(out.hidden_states[-1], want, inputs["attention_mask"]) < TOLERANCE
    assert gap(REFERENCE[f"{kind}.base.hidden"], want, inputs["attention_mask"]) > 0.1  # the adapter does something
    if kind == "bert-cls":  # the head came with it
        assert (out.logits - REFERENCE[f"{folder}.logits"]).abs().max() < TOLERANCE


def test_houlsby_reads_the_dropped_out_projection_in_training():
    """With dropout on, AdapterHub (as Houlsby's reference code) computes h' = drop(h), h' + A(h'): the same
    dropout masks (same seed, same order of draws) give the same outputs."""
    inputs = batch("bert-mlm")
    tuned = slimtune.load(base_model("bert-mlm"), HERE / "bert-mlm/houlsby")
    tuned.train()
    torch.manual_seed(TRAIN_SEED)
    got = hidden(tuned, inputs)
    want = REFERENCE["bert-mlm/houlsby.train.hidden"]
    assert gap(got, REFERENCE["bert-mlm/houlsby.hidden"], inputs["attention_mask"]) > 0.1  # dropout was on
    assert gap(got, want, inputs["attention_mask"]) < TOLERANCE


def test_pfeiffer_is_not_houlsby_after_the_feed_forward_block():
    """The same weights read as Houlsby's adapter at the feed-forward output compute something else."""
    inputs = batch("bert-mlm")
    pfeiffer = slimtune.load(base_model("bert-mlm"), HERE / "bert-mlm/pfeiffer")
    state = {k.replace(".LayerNorm.adapter.", ".dense.adapter."): v for k, v in pfeiffer.bank.state("default").items()}
    method = slimtune.Adapter(size=4, placement="houlsby-ffn")
    other = slimtune.load(base_model("bert-mlm"), HERE / "bert-mlm/pfeiffer")
    other.bank.remove("default")
    other.bank.add("default", (method, state))
    assert gap(hidden(other, inputs), REFERENCE["bert-mlm/pfeiffer.hidden"], inputs["attention_mask"]) > 0.1


@pytest.mark.parametrize("kind", ["bert-cls", "gpt2", "llama"])
def test_adapterhub_rows_in_a_mixed_batch_equal_each_alone(kind):
    """Rows of a Houlsby user, a Pfeiffer user, the base model and a slimtune LoRA user in one batch: each row is
    AdapterHub's output for it (or the LoRA alone)."""
    inputs = batch(kind)
    model = base_model(kind)
    bank = slimtune.Bank(model)
    bank.add("houlsby", HERE / f"{kind}/houlsby")
    bank.add("pfeiffer", HERE / f"{kind}/pfeiffer")
    bank.add("lora", slimtune.LoRA(rank=4))
    perturb(bank.user_parameters("lora"), seed=3)
    users = ["pfeiffer", "houlsby", None, "lora"]
    with torch.no_grad():
        mixed = bank(**inputs, users=users, output_hidden_states=True)
        lora = bank(**inputs, users=["lora"] * 4, output_hidden_states=True)
    want = {"houlsby": REFERENCE[f"{kind}/houlsby.hidden"], "pfeiffer": REFERENCE[f"{kind}/pfeiffer.hidden"],
            None: REFERENCE[f"{kind}.base.hidden"], "lora": lora.hidden_states[-1]}
    for row, user in enumerate(users):
        mask = inputs["attention_mask"][row:row + 1]
        assert gap(mixed.hidden_states[-1][row:row + 1], want[user][row:row + 1], mask) < TOLERANCE, user
        if kind == "bert-cls" and user in ("houlsby", "pfeiffer"):
            assert (mixed.logits[row] - REFERENCE[f"{kind}/{user}.logits"][row]).abs().max() < TOLERANCE


def test_a_store_takes_an_adapterhub_folder_and_serves_it(tmp_path):
    model = base_model("bert-cls")
    store = slimtune.Store(tmp_path / "store", model)
    store.add("alice", HERE / "bert-cls/pfeiffer")
    tuned = slimtune.load(base_model("bert-cls"), store.entry("alice").path)
    inputs = batch("bert-cls")
    with torch.no_grad():
        logits = tuned(**inputs).logits
    assert (logits - REFERENCE["bert-cls/pfeiffer.logits"]).abs().max() < TOLERANCE


def copy_with_config(tmp_path, folder: str, **changes):
    """A copy of a fixture folder with settings of its adapter config changed."""
    out = tmp_path / folder.replace("/", "-")
    shutil.copytree(HERE / folder, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["config"].update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("changes, refused", [
    ({"phm_layer": True}, "Compacter"),
    ({"is_parallel": True}, "parallel adapters"),
    ({"use_gating": True}, "use_gating"),
    ({"ln_after": True}, "ln_after"),
    ({"inv_adapter": "nice"}, "invertible"),
    ({"scaling": "learned"}, "scaling='learned'"),
    ({"residual_before_ln": False}, "residual_before_ln=False"),
    ({"mh_adapter": True}, "after attention too"),
    ({"non_linearity": "gelu_new"}, "non_linearity 'gelu_new'"),
    ({"leave_out": [0, 7]}, "cannot express"),
    ({"architecture": "prefix_tuning"}, "positions"),
    ({"architecture": "union"}, "ConfigUnion"),
])
def test_what_has_no_equivalent_is_refused_with_its_option_named(tmp_path, changes, refused):
    folder = copy_with_config(tmp_path, "bert-mlm/pfeiffer", **changes)
    with pytest.raises(TuningError, match=refused.replace("(", r"\(").replace("'", "'")):
        slimtune.load(base_model("bert-mlm"), folder)


def test_adapterhubs_own_prefix_tuning_folder_is_refused_saying_why():
    with pytest.raises(TuningError, match="prefix tuning: AdapterHub keeps the real tokens at positions 0"):
        slimtune.load(base_model("bert-mlm"), HERE / "bert-mlm/prefix")


@pytest.mark.parametrize("changes, refused", [
    ({"composition_mode": "scale"}, "composition_mode='scale'"),
    ({"use_dora": True}, "DoRA"),
    ({"vera_d": 0.1}, "VeRA"),
])
def test_lora_options_without_an_equivalent_are_refused(tmp_path, changes, refused):
    folder = copy_with_config(tmp_path, "llama/lora", **changes)
    with pytest.raises(TuningError, match=refused.replace("(", r"\(")):
        slimtune.load(base_model("llama"), folder)


def test_a_folder_for_another_model_is_a_model_mismatch():
    with pytest.raises(ModelMismatchError, match="'bert' model"):
        slimtune.load(base_model("llama"), HERE / "bert-mlm/pfeiffer")
    with pytest.raises(ModelMismatchError, match="hidden size 64"):
        model = base_model("bert-mlm")
        model.config.hidden_size = 32  # the check reads the config before any shape
        slimtune.load(model, HERE / "bert-mlm/pfeiffer")


def test_a_head_needs_a_model_with_that_head():
    with pytest.raises(TuningError, match="carries a task head"):
        slimtune.load(base_model("bert-mlm"), HERE / "bert-cls/pfeiffer")
    with pytest.raises(TuningError, match="carries none"):  # the head left out of the folder
        slimtune.load(base_model("bert-cls"), HERE / "bert-mlm/pfeiffer")


def test_flex_heads_are_refused(tmp_path):
    folder = tmp_path / "flex"
    shutil.copytree(HERE / "bert-cls/pfeiffer", folder)
    head = json.loads((folder / "head_config.json").read_text())
    head["config"] = {"head_type": "classification", "num_labels": 3, "layers": 2}
    (folder / "head_config.json").write_text(json.dumps(head))
    with pytest.raises(TuningError, match="flex heads"):
        slimtune.load(base_model("bert-cls"), folder)


def test_hostile_weights_are_refused_without_running_code(tmp_path):
    folder = tmp_path / "hostile"
    shutil.copytree(HERE / "bert-mlm/houlsby-string", folder)

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Boom()}, folder / "pytorch_adapter.bin")
    with pytest.raises(TuningFileError, match="cannot be read"):
        slimtune.load(base_model("bert-mlm"), folder)
    tensors = torch.load(HERE / "bert-mlm/houlsby-string/pytorch_adapter.bin", weights_only=True)
    name = next(iter(tensors))
    torch.save({**tensors, name: torch.full_like(tensors[name], float("nan"))}, folder / "pytorch_adapter.bin")
    with pytest.raises(TuningFileError, match="finite"):
        slimtune.load(base_model("bert-mlm"), folder)
    bias = next(k for k in tensors if k.endswith("adapter_up.bias"))
    torch.save({**tensors, bias: tensors[bias][:-1]}, folder / "pytorch_adapter.bin")  # a wrong shape
    with pytest.raises(ModelMismatchError, match="up.bias' has shape"):
        slimtune.load(base_model("bert-mlm"), folder)


def test_an_adapter_saved_when_pfeiffer_meant_houlsby_after_ffn_is_refused_saying_how_to_load_it():
    model = base_model("bert-mlm")
    old = slimtune.attach(model, slimtune.Adapter(size=4, placement="houlsby-ffn"))
    perturb(old.tuning_parameters(), seed=2)
    state = old.bank.state("default")
    bank = slimtune.Bank(base_model("bert-mlm"))
    with pytest.raises(TuningError, match="now placement 'houlsby-ffn'"):
        bank.add("old", (slimtune.Adapter(size=4, placement="pfeiffer", ffn_output=old.method.ffn_output), state))
