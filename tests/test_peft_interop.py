"""HF PEFT folders: read by slimtune.load / Bank.add, written by TunedModel.save(format="peft").

Every comparison runs the same tiny random model (same seed) twice, once wrapped by PEFT and once
by slimtune, on separate instances (PEFT's LoRA changes the modules of the model it wraps).

Generation: with peft 0.21.2 on transformers 5.24, PEFT's own generate() is correct for LoRA, but
for prompt tuning it drifts from its own forward after the first new token, and for prefix tuning
it returns the base model's tokens (Llama) or other tokens (GPT-2). So greedy decoding is checked
against a greedy loop over PEFT's forward pass (the whole sequence recomputed every step), and
against PEFT's generate() for LoRA.

Padding: PEFT's prompt and prefix tunings count positions from the first column of a padded row
(the prompt goes before the padding), so a left-padded row differs from the same row alone;
slimtune's padded row equals the row alone. Padded batches are therefore checked row by row
against PEFT on each row alone.
"""

import json
import warnings

import pytest
import torch
from peft import LoHaConfig, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

import slimtune
from slimtune.errors import ModelMismatchError, TuningError

from conftest import VOCAB, build
from helpers import generated, padded_batch, perturb, real_tokens

K = 3  # virtual tokens
ATOL = 1e-5
KINDS = ["lora", "prompt", "prefix"]
ARCHS = ["gpt2", "llama", "gemma3"]
# PEFT's Gemma 3 prefix lives in a cache of sliding and full layers that slimtune refuses to convert (tested below).
CASES = [(arch, kind) for arch in ARCHS for kind in KINDS if (arch, kind) != ("gemma3", "prefix")]
PREFIX_ARCHS = ["gpt2", "llama"]

# PEFT and transformers warn about their own internals (deprecated past_key_values, fan_in_fan_out fixes).
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def peft_config(arch: str, kind: str, **options):
    if kind == "lora":
        return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, fan_in_fan_out=arch == "gpt2", **options)
    if kind == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, **options)
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, **options)


def peft_model(arch: str, config, seed: int = 0):
    """A PEFT model with random, non-zero tuning weights (LoRA's B included)."""
    model = get_peft_model(build(arch), config)
    perturb([p for p in model.parameters() if p.requires_grad], seed=seed, scale=0.3)
    return model.eval()


def peft_folder(tmp_path, arch: str, kind: str, **options):
    model = peft_model(arch, peft_config(arch, kind, **options))
    folder = tmp_path / f"peft_{arch}_{kind}"
    model.save_pretrained(folder)
    return model, folder


def peft_logits(model, ids, kind: str) -> torch.Tensor:
    """PEFT's logits over the real tokens (its prompt tuning returns the virtual positions too)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits[:, K:] if kind == "prompt" else logits


def slim_logits(tuned, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return tuned(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask).logits


def unpadded(seed: int = 3, batch: int = 3, length: int = 6) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(forward, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with the whole sequence recomputed every step: no cache, so only forward is trusted."""
    sequence = ids
    with torch.no_grad():
        for _ in range(steps):
            sequence = torch.cat([sequence, forward(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence


# --- 1. PEFT folder -> slimtune ----------------------------------------------------------------

@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_peft_folder_loads_with_the_same_logits(tmp_path, arch, kind):
    reference, folder = peft_folder(tmp_path, arch, kind)
    tuned = slimtune.load(build(arch), folder)
    ids = unpadded()
    assert torch.allclose(slim_logits(tuned, ids), peft_logits(reference, ids, kind), atol=ATOL)
    assert not torch.allclose(slim_logits(tuned, ids), build(arch)(input_ids=ids).logits, atol=1e-2)  # not a no-op

    # A left-padded batch: each row as PEFT computes it alone.
    ids, mask = padded_batch(arch, [6, 4, 2])
    logits = slim_logits(tuned, ids, mask)
    for b in range(ids.shape[0]):
        alone = peft_logits(reference, real_tokens(ids, mask, b), kind)
        assert torch.allclose(logits[b][mask[b].bool()], alone[0], atol=ATOL)


@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_peft_folder_generates_what_peft_forward_decodes(tmp_path, arch, kind):
    reference, folder = peft_folder(tmp_path, arch, kind)
    tuned = slimtune.load(build(arch), folder)
    ids = unpadded(seed=5, batch=2, length=5)
    steps = 6
    expected = greedy(lambda s: peft_logits(reference, s, kind), ids, steps)
    out = tuned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False)
    for b in range(ids.shape[0]):
        assert generated(out[b], ids.shape[1]) == generated(expected[b], ids.shape[1])
    if kind == "lora":  # PEFT's generate() is right for LoRA only (see the module docstring)
        with torch.no_grad():
            theirs = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False)
        for b in range(ids.shape[0]):
            assert generated(out[b], ids.shape[1]) == generated(theirs[b], ids.shape[1])


@pytest.mark.parametrize("arch", PREFIX_ARCHS)
def test_peft_prefix_with_projection_loads_as_its_computed_prefix(tmp_path, arch):
    """PEFT saves the MLP's output, not the MLP, so a prefix_projection=True folder reads like any other."""
    reference, folder = peft_folder(tmp_path, arch, "prefix", prefix_projection=True, encoder_hidden_size=16)
    tuned = slimtune.load(build(arch), folder)
    assert tuned.method == slimtune.PrefixTuning(length=K, reparam=None, init="random")
    ids = unpadded()
    assert torch.allclose(slim_logits(tuned, ids), peft_logits(reference, ids, "prefix"), atol=ATOL)


def test_peft_lora_layers_to_transform_reads_as_the_layers_it_names(tmp_path):
    reference, folder = peft_folder(tmp_path, "llama", "lora", target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    tuned = slimtune.load(build("llama"), folder)
    assert tuned.method.targets == ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
    ids = unpadded()
    assert torch.allclose(slim_logits(tuned, ids), peft_logits(reference, ids, "lora"), atol=ATOL)


def test_peft_lora_keeps_its_target_modules(tmp_path):
    _, folder = peft_folder(tmp_path, "llama", "lora", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    method = slimtune.load(build("llama"), folder).method
    assert method == slimtune.LoRA(rank=4, alpha=8.0, dropout=0.0, targets=("k_proj", "o_proj", "q_proj", "v_proj"))


# --- 2. slimtune -> PEFT folder ----------------------------------------------------------------

def slim_method(kind: str) -> slimtune.Method:
    if kind == "lora":
        return slimtune.LoRA(rank=4, alpha=8)
    if kind == "prompt":
        return slimtune.PromptTuning(length=K, init="uniform")
    return slimtune.PrefixTuning(length=K, reparam="mlp", mlp_hidden=16, init="random")  # exported as its computed prefix


@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_export_loads_in_peft_with_the_same_logits(tmp_path, arch, kind):
    tuned = slimtune.attach(build(arch), slim_method(kind))
    perturb(tuned.tuning_parameters(), scale=0.3)
    folder = tuned.save(tmp_path / "export", format="peft")
    assert folder == tmp_path / "export" and sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    theirs = PeftModel.from_pretrained(build(arch), folder).eval()
    ids = unpadded()
    ours = slim_logits(tuned, ids)
    assert torch.allclose(peft_logits(theirs, ids, kind), ours, atol=ATOL)
    # And back: the exported folder reads into slimtune as the same tuning.
    assert torch.allclose(slim_logits(slimtune.load(build(arch), folder), ids), ours, atol=ATOL)


def test_export_lora_of_encoder_decoder(tmp_path):
    """LoRA is the same computation on any architecture; T5's default targets are q and v."""
    tuned = slimtune.attach(build("t5"), slimtune.LoRA(rank=4, alpha=8))
    perturb(tuned.tuning_parameters(), scale=0.3)
    theirs = PeftModel.from_pretrained(build("t5"), tuned.save(tmp_path / "export", format="peft")).eval()
    ids, decoder_ids = unpadded(), unpadded(seed=4, length=4)
    with torch.no_grad():
        ours = tuned(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder_ids).logits
        expected = theirs(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder_ids).logits
    assert torch.allclose(ours, expected, atol=ATOL)


def test_export_lora_config_mirrors_peft(tmp_path):
    tuned = slimtune.attach(build("gpt2"), slimtune.LoRA(rank=4, alpha=8))
    config = json.loads((tuned.save(tmp_path / "export", format="peft") / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["c_attn"] and config["fan_in_fan_out"] is True
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8, "none")


def test_export_prefix_on_gqa_uses_key_value_heads(tmp_path):
    tuned = slimtune.attach(build("llama"), slimtune.PrefixTuning(length=K, reparam=None, init="random"))
    config = json.loads((tuned.save(tmp_path / "export", format="peft") / "adapter_config.json").read_text())
    assert (config["num_attention_heads"], config["token_dim"], config["num_layers"]) == (2, 16, 2)  # 2 kv heads of 8


# --- 3. what is refused ------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "named"), [
    (LoraConfig(task_type="CAUSAL_LM", r=4, modules_to_save=["lm_head"]), "modules_to_save"),
    (LoHaConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]), "LOHA"),
], ids=["modules_to_save", "loha"])
def test_unsupported_peft_folders_are_refused_by_name(tmp_path, config, named):
    model = get_peft_model(build("llama"), config)
    model.save_pretrained(tmp_path / "peft")
    with pytest.raises(TuningError, match=named):
        slimtune.load(build("llama"), tmp_path / "peft")


@pytest.mark.parametrize(("change", "named"), [
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "bias='all'"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"init_lora_weights": "pissa"}, "pissa"),
    ({"some_future_option": 3}, "some_future_option"),
], ids=["lora_bias", "bias", "rank_pattern", "pissa", "unknown"])
def test_unsupported_lora_options_are_refused_by_name(tmp_path, change, named):
    _, folder = peft_folder(tmp_path, "llama", "lora")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | change))
    with pytest.raises(TuningError, match=named):
        slimtune.load(build("llama"), folder)


def test_peft_folder_for_another_model_is_a_mismatch(tmp_path):
    _, lora = peft_folder(tmp_path, "gpt2", "lora")
    with pytest.raises(ModelMismatchError, match="transformer.h.0.attn.c_attn"):
        slimtune.load(build("llama"), lora)
    _, prefix = peft_folder(tmp_path, "gpt2", "prefix")  # 4 heads of 8; Llama's keys are 2 heads of 8
    with pytest.raises(ModelMismatchError, match="num_attention_heads"):
        slimtune.load(build("llama"), prefix)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps(config | {"r": 8, "lora_alpha": 16}))  # tensors are rank 4
    with pytest.raises(ModelMismatchError, match="shape"):
        slimtune.load(build("gpt2"), lora)
    _, prompt = peft_folder(tmp_path, "gpt2", "prompt")
    weights = prompt / "adapter_model.safetensors"
    narrow = load_file(weights)["prompt_embeddings"][:, :16].contiguous()  # 16 wide; the model is 32
    save_file({"prompt_embeddings": narrow}, weights)
    with pytest.raises(ModelMismatchError, match="shape"):
        slimtune.load(build("gpt2"), prompt)


@pytest.mark.parametrize(("method", "named"), [
    (slimtune.Adapter(size=4), "Houlsby"),
    (slimtune.Adapter(size=4, placement="pfeiffer"), "Pfeiffer"),
    (slimtune.BitFit(), "BitFit"),
    (slimtune.FullFineTuning(), "full fine-tuning"),
], ids=["houlsby", "pfeiffer", "bitfit", "full"])
def test_export_without_peft_equivalent_is_refused(tmp_path, method, named):
    tuned = slimtune.attach(build("gpt2"), method)
    with pytest.raises(TuningError, match=named):
        tuned.save(tmp_path / "export", format="peft")
    assert not (tmp_path / "export").exists()


def test_peft_prefix_on_gemma3_is_refused_both_ways_with_the_reason(tmp_path):
    """PEFT fills Gemma 3's cache (sliding-window and full layers) in a way of its own."""
    _, folder = peft_folder(tmp_path, "gemma3", "prefix")
    with pytest.raises(TuningError, match=r"(?s)PEFT prefix tuning: Gemma3ForCausalLM.*gemma3_text.*sliding_attention"
                                          r".*every layer is full attention.*format='slimtune'"):
        slimtune.load(build("gemma3"), folder)
    tuned = slimtune.attach(build("gemma3"), slim_method("prefix"))
    with pytest.raises(TuningError, match="prefix tuning in PEFT's format: Gemma3ForCausalLM"):
        tuned.save(tmp_path / "export", format="peft")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_export_prompt_or_prefix_of_encoder_decoder_is_refused(tmp_path, kind):
    tuned = slimtune.attach(build("t5"), slim_method(kind))
    with pytest.raises(TuningError, match="decoder-only causal LMs"):
        tuned.save(tmp_path / "export", format="peft")


# --- 4. a PEFT folder in a mixed bank ----------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_peft_folders_and_slimtune_prefix_in_one_bank(tmp_path, arch):
    """PEFT LoRA, prompt and prefix folders beside a slimtune prefix (added first, so the PEFT prefix
    is read on a model already switched to slimtune's attention), each row as it is alone."""
    bank = slimtune.Bank(build(arch))
    bank.add("prefix", slimtune.PrefixTuning(length=K, reparam=None, init="random"))
    perturb(bank.user_parameters("prefix"), scale=0.3)
    references = {}
    for kind in [k for a, k in CASES if a == arch]:
        references[f"peft_{kind}"], folder = peft_folder(tmp_path, arch, kind)
        bank.add(f"peft_{kind}", folder)
    users = ["peft_lora", "prefix", None, "peft_lora", "peft_prompt", "peft_prefix", "prefix"]
    users = [u if u in bank.users or u is None else "peft_prompt" for u in users]
    ids, mask = padded_batch(arch, [6, 5, 4, 3, 5, 2, 6])
    with torch.no_grad():
        mixed = bank(input_ids=ids, attention_mask=mask, users=users).logits
        for b, user in enumerate(users):
            row = real_tokens(ids, mask, b)
            alone = bank(input_ids=row, attention_mask=torch.ones_like(row), users=[user]).logits
            assert torch.allclose(mixed[b][mask[b].bool()], alone[0], atol=ATOL)
            if user in references:
                assert torch.allclose(alone, peft_logits(references[user], row, user[len("peft_"):]), atol=ATOL)


def test_differently_named_base_model_only_warns(tmp_path):
    _, folder = peft_folder(tmp_path, "gpt2", "lora")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/other-model"}))
    model = build("gpt2")
    model.config._name_or_path = "org/tiny-gpt2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slimtune.load(model, folder)
    assert any("org/other-model" in str(w.message) for w in caught)
