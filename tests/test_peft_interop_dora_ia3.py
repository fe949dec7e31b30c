"""PEFT's DoRA (LoraConfig(use_dora=True)), rsLoRA (use_rslora=True) and IA3 folders, both ways: logits equal
to the real `peft` package's, alone and beside PEFT LoRA, prompt and prefix folders in one bank.

As in test_peft_interop.py, every comparison builds the same tiny random model twice, once wrapped by PEFT
and once by slimtune, and padded rows are compared with PEFT on each row alone.
"""

import json

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

import slimtune
from slimtune.errors import ModelMismatchError, TuningError, TuningFileError

from conftest import VOCAB, build
from helpers import padded_batch, perturb, real_tokens

ATOL = 1e-5
K = 3  # virtual tokens of the prompt and prefix folders
ARCHS = ["gpt2", "llama"]
KINDS = ["dora", "rslora", "dora-rslora", "ia3"]

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def peft_config(arch: str, kind: str, **options):
    if kind == "ia3":
        return IA3Config(task_type="CAUSAL_LM", **options)
    if kind == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K)
    if kind == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K)
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, fan_in_fan_out=arch == "gpt2",
                      use_dora="dora" in kind, use_rslora="rslora" in kind, **options)


def peft_folder(tmp_path, arch: str, kind: str, **options):
    """A PEFT model with random tuning weights (IA3 vectors and DoRA magnitudes moved off their start), saved."""
    model = get_peft_model(build(arch), peft_config(arch, kind, **options))
    perturb([p for p in model.parameters() if p.requires_grad], seed=len(kind), scale=0.3)
    folder = tmp_path / f"peft_{arch}_{kind}"
    model.eval().save_pretrained(folder)
    return model, folder


def logits(model, ids, kind: str = "") -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return out[:, K:] if kind == "prompt" else out  # PEFT's prompt tuning returns the virtual positions too


def unpadded(seed: int = 3) -> torch.Tensor:
    return torch.randint(2, VOCAB, (3, 6), generator=torch.Generator().manual_seed(seed))


def slim_method(kind: str) -> slimtune.Method:
    if kind == "ia3":
        return slimtune.IA3()
    cls = slimtune.DoRA if "dora" in kind else slimtune.LoRA
    return cls(rank=4, alpha=8, rslora="rslora" in kind)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_peft_folder_loads_with_the_same_logits(tmp_path, arch, kind):
    reference, folder = peft_folder(tmp_path, arch, kind)
    tuned = slimtune.load(build(arch), folder)
    assert type(tuned.method) is type(slim_method(kind))
    assert getattr(tuned.method, "rslora", False) == ("rslora" in kind)
    ids = unpadded()
    ours = logits(tuned, ids)
    assert (ours - logits(reference, ids)).abs().max() < ATOL
    assert (ours - logits(build(arch), ids)).abs().max() > 1e-2  # not a no-op

    ids, mask = padded_batch(arch, [6, 4, 2])
    with torch.no_grad():
        padded = tuned(input_ids=ids, attention_mask=mask).logits
    for b in range(ids.shape[0]):
        alone = logits(reference, real_tokens(ids, mask, b))
        assert (padded[b][mask[b].bool()] - alone[0]).abs().max() < ATOL


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_in_peft_with_the_same_logits(tmp_path, arch, kind):
    tuned = slimtune.attach(build(arch), slim_method(kind))
    perturb(tuned.tuning_parameters(), scale=0.3)
    folder = tuned.save(tmp_path / "export", format="peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    if kind == "ia3":
        assert config["peft_type"] == "IA3" and set(config["feedforward_modules"]) <= set(config["target_modules"])
    else:
        assert (config["use_dora"], config["use_rslora"]) == ("dora" in kind, "rslora" in kind)
    theirs = PeftModel.from_pretrained(build(arch), folder).eval()
    ids = unpadded()
    ours = logits(tuned, ids)
    assert (logits(theirs, ids) - ours).abs().max() < ATOL
    back = slimtune.load(build(arch), folder)  # and back, as the same tuning
    assert (logits(back, ids) - ours).abs().max() < ATOL


def test_peft_ia3_keeps_its_patterns_and_reads_feedforward_from_the_shapes(tmp_path):
    options = {"target_modules": r".*\.(k_proj|up_proj|down_proj)", "feedforward_modules": r".*\.down_proj"}
    reference, folder = peft_folder(tmp_path, "llama", "ia3", **options)
    tuned = slimtune.load(build("llama"), folder)
    assert tuned.method == slimtune.IA3(targets=options["target_modules"], feedforward=options["feedforward_modules"])
    ids = unpadded()
    assert (logits(tuned, ids) - logits(reference, ids)).abs().max() < ATOL
    # The vectors' shapes decide, whatever feedforward_modules says: [1, in] scales the input.
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"feedforward_modules": []}))
    assert (logits(slimtune.load(build("llama"), folder), ids) - logits(reference, ids)).abs().max() < ATOL


def test_export_ia3_with_its_own_patterns(tmp_path):
    method = slimtune.IA3(targets=["k_proj", "up_proj", "down_proj"], feedforward=["down_proj"])
    tuned = slimtune.attach(build("llama"), method)
    perturb(tuned.tuning_parameters(), scale=0.3)
    folder = tuned.save(tmp_path / "export", format="peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (sorted(config["target_modules"]), config["feedforward_modules"]) == (["down_proj", "k_proj", "up_proj"],
                                                                                 ["down_proj"])
    theirs = PeftModel.from_pretrained(build("llama"), folder).eval()
    ids = unpadded()
    assert (logits(theirs, ids) - logits(tuned, ids)).abs().max() < ATOL


def test_peft_folders_of_every_kind_in_one_bank(tmp_path):
    """PEFT DoRA, rsLoRA and IA3 folders beside PEFT LoRA, prompt and prefix folders and a slimtune DoRA, in
    one padded batch: each row as it is alone, and each PEFT row as PEFT computes it."""
    for arch in ARCHS:
        bank = slimtune.Bank(build(arch))
        bank.add("dora", slimtune.DoRA(rank=2))
        perturb(bank.user_parameters("dora"), scale=0.3)
        references = {}
        for kind in ["dora", "rslora", "ia3", "lora", "prompt", "prefix"]:
            references[f"peft_{kind}"], folder = peft_folder(tmp_path, arch, kind)
            bank.add(f"peft_{kind}", folder)
        users = ["peft_dora", "dora", None, "peft_ia3", "peft_prompt", "peft_rslora", "peft_prefix", "peft_lora",
                 "peft_ia3", "peft_dora"]
        ids, mask = padded_batch(arch, [6, 5, 4, 3, 5, 2, 6, 4, 5, 3])
        with torch.no_grad():
            mixed = bank(input_ids=ids, attention_mask=mask, users=users).logits
            for b, user in enumerate(users):
                row = real_tokens(ids, mask, b)
                alone = bank(input_ids=row, attention_mask=torch.ones_like(row), users=[user]).logits
                assert (mixed[b][mask[b].bool()] - alone[0]).abs().max() < ATOL, (arch, user)
                if user in references:
                    kind = user[len("peft_"):]
                    assert (alone - logits(references[user], row, kind)).abs().max() < ATOL, (arch, user)


def test_peft_folders_that_do_not_fit_are_refused_by_name(tmp_path):
    _, ia3 = peft_folder(tmp_path, "llama", "ia3")
    weights = ia3 / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    save_file(tensors | {key: tensors[key][:, :32].contiguous()}, weights)  # down_proj takes 64 inputs
    with pytest.raises(ModelMismatchError, match=r"down_proj.*\(1, 32\).*\(1, 64\)"):
        slimtune.load(build("llama"), ia3)

    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps(config | {"some_future_option": 3}))
    with pytest.raises(TuningError, match="IA3 options.*some_future_option"):
        slimtune.load(build("llama"), ia3)

    _, dora = peft_folder(tmp_path, "llama", "dora")
    weights = dora / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "magnitude" not in k}, weights)
    with pytest.raises(TuningFileError, match="lora_magnitude_vector"):
        slimtune.load(build("llama"), dora)
