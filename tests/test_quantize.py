"""A quantised frozen base (bitsandbytes NF4, torchao int8): tunings train and serve over it as over an fp32 one."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny import WORDS, sentiment_file, tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

import slimtune
from slimtune import compare, quantize
from slimtune.cli import main as cli_main
from slimtune.cli import parser
from slimtune.engine import Engine
from slimtune.errors import TuningError
from slimtune.models import load_model
from slimtune.modules import find_linears

from conftest import VOCAB
from helpers import perturb, vocab_tokenizer

PACKAGES = {name: scheme.package for name, scheme in quantize.SCHEMES.items()}
SCHEMES = [pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(package) is None,
                                                        reason=f"{package} is not installed (slimtune[quant])"))
           for name, package in PACKAGES.items()]
TUNINGS = {
    "lora": lambda: slimtune.LoRA(rank=4),
    "adapter": lambda: slimtune.Adapter(size=8),
    "prefix": lambda: slimtune.PrefixTuning(length=3, reparam=None, init="random"),
}


def quantisable_llama(width: int = 64, vocab: int = VOCAB) -> LlamaForCausalLM:
    """A tiny random Llama whose layers' input widths are whole blocks of 64 weights (as real models' are):
    bitsandbytes' AVX512 CPU kernel misreads partial blocks (`quantize.misread_nf4_layers`)."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=1, pad_token_id=0, initializer_range=0.2)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Llama saved as a model folder, with a word-level tokenizer for its ids."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    quantisable_llama().save_pretrained(path)
    vocab_tokenizer().save_pretrained(path)
    return path


def batch(seed: int = 3, rows: int = 4, length: int = 10):
    ids = torch.randint(2, 96, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def frozen_weights(model) -> dict[str, torch.Tensor]:
    """Every base weight as the values it stands for (quantised ones de-quantised: a change to what they store
    changes these; their layout may change in inference, see `quantize.dense_weight`)."""
    out, quantised = {}, set()
    for name, module in model.named_modules():
        if quantize.is_quantised(module):
            quantised.add(id(module.weight))
            out[name] = quantize.dense_weight(module).clone()
    for name, p in model.named_parameters():
        if id(p) not in quantised:
            out[name] = p.detach().clone()
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_quantised_base_has_its_body_quantised_its_head_not_and_costs_less_memory(folder, scheme):
    dense, _ = load_model(folder)
    model, _ = load_model(folder, quantize=scheme)
    assert quantize.scheme_of(model) == scheme and quantize.scheme_of(dense) is None
    body = find_linears(model, r"model\.layers\..*")
    assert len(body) == 14 and all(quantize.is_quantised(m) for _, m in body)  # every site a method may hook
    assert not quantize.is_quantised(model.lm_head)
    # the layers compute with what their weights stand for: close to the fp32 weights they were made from
    dense_layers = dict(dense.named_modules())
    for name, layer in body:
        x = torch.randn(3, layer.in_features)
        weight = quantize.dense_weight(layer)
        torch.testing.assert_close(layer(x), x @ weight.T, atol=1e-5, rtol=1e-5)
        error = (weight - dense_layers[name].weight).abs().max() / dense_layers[name].weight.abs().max()
        assert 0 < error < (0.16 if scheme == "nf4" else 0.005), name  # half the widest level of 16 (0.152), or of 255
    assert quantize.parameter_count(model) == quantize.parameter_count(dense) == sum(p.numel() for p in dense.parameters())
    # 4 bits and a 4-byte scale per 64 weights (nf4), or a byte and a 5-byte scale per row of 32 here (int8)
    linear_bytes = sum(quantize.tensor_bytes(m.weight) for _, m in body)
    assert linear_bytes / sum(4 * dense_layers[n].weight.numel() for n, _ in body) < (0.16 if scheme == "nf4" else 0.3)
    assert quantize.model_bytes(model) < quantize.model_bytes(dense)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory maps (Linux)")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_quantised_base_does_not_keep_the_full_precision_checkpoint_mapped(scheme, tmp_path):
    """Quantising reads the whole fp32 file: kept mapped, every page read would stay resident."""
    path = tmp_path / "model"
    torch.manual_seed(0)
    quantisable_llama().save_pretrained(path)
    vocab_tokenizer().save_pretrained(path)
    model, _ = load_model(path, quantize=scheme)
    assert not [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]
    with torch.no_grad():  # and the copies it holds instead are the ones it runs on
        assert torch.isfinite(model(**batch()).logits).all()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", list(TUNINGS))
def test_training_over_a_quantised_base_changes_only_the_tuning_and_lowers_the_loss(folder, scheme, kind):
    model, _ = load_model(folder, quantize=scheme)
    before = frozen_weights(model)
    torch.manual_seed(0)
    tuned = slimtune.attach(model, TUNINGS[kind]())
    inputs = batch()
    params = tuned.tuning_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    tuned.train()
    losses = []
    for step in range(8):
        loss = tuned(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        if step == 1:  # (not at step 0: LoRA's B and the adapters' up start at zero, and so does the other's gradient)
            # the gradient reached every tensor of the tuning, through the frozen quantised layers
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    after = frozen_weights(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen weight changed"


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_a_zero_initialised_tuning_leaves_the_quantised_base_unchanged(folder, scheme, kind):
    model, _ = load_model(folder, quantize=scheme)
    inputs = batch()
    with torch.no_grad():
        base = model(**inputs).logits
        tuned = slimtune.attach(model, TUNINGS[kind]())
        assert torch.equal(tuned(**inputs).logits, base)
        perturb(tuned.tuning_parameters())
        assert not torch.allclose(tuned(**inputs).logits, base, atol=1e-3)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_tuning_saved_over_a_quantised_base_holds_no_base_weight_and_reloads(folder, scheme, tmp_path):
    from safetensors import safe_open

    model, tokenizer = load_model(folder, quantize=scheme)
    tuned = slimtune.attach(model, slimtune.LoRA(rank=4))
    perturb(tuned.tuning_parameters())
    inputs = batch()
    with torch.no_grad():
        want = tuned(**inputs).logits
    tuned.save(tmp_path / "tuning")
    (weights,) = (tmp_path / "tuning").glob("*.safetensors")
    with safe_open(weights, "pt") as f:
        names = list(f.keys())
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert sum(p.stat().st_size for p in (tmp_path / "tuning").iterdir()) < 20_000
    tuned.bank.detach()
    again, _ = load_model(folder, quantize=scheme)
    with torch.no_grad():
        assert torch.equal(slimtune.load(again, tmp_path / "tuning")(**inputs).logits, want)
    # the same tuning loads on the fp32 base the quantised one was made from (its fingerprint is the same)
    dense, _ = load_model(folder)
    on_dense = slimtune.load(dense, tmp_path / "tuning")
    assert all(torch.equal(a, b) for a, b in zip(on_dense.tuning_parameters(), tuned.tuning_parameters(), strict=True))


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.values[0] == "nf4"])
def test_layers_the_nf4_kernel_would_misread_are_refused_or_read_right(tmp_path, scheme):
    """Rows of 32 weights, half a block: on an AVX512 CPU bitsandbytes 0.50 de-quantises them wrongly, so loading
    is refused, naming the layers; elsewhere each layer computes with its weight within NF4's rounding."""
    torch.manual_seed(0)
    quantisable_llama(width=32).save_pretrained(tmp_path / "m")
    vocab_tokenizer().save_pretrained(tmp_path / "m")
    dense, _ = load_model(tmp_path / "m")
    try:
        model, _ = load_model(tmp_path / "m", quantize=scheme)
    except TuningError as err:
        assert "multiple of its block of 64" in str(err) and "model.layers.0.self_attn.q_proj" in str(err)
        return
    layers = dict(dense.named_modules())
    for name, layer in find_linears(model, r"model\.layers\..*"):
        error = (quantize.dense_weight(layer) - layers[name].weight).abs().max() / layers[name].weight.abs().max()
        assert error < 0.16, name  # half NF4's widest step, 0.152 of a block's largest weight


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_parameter_report_counts_a_quantised_base_as_the_weights_it_stands_for(folder, scheme):
    dense = slimtune.parameter_report(slimtune.attach(load_model(folder)[0], slimtune.LoRA(rank=4)))
    packed = slimtune.parameter_report(slimtune.attach(load_model(folder, quantize=scheme)[0], slimtune.LoRA(rank=4)))
    assert packed.total == dense.total and packed.trainable == dense.trainable


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_engine_serves_tunings_over_a_quantised_base_each_row_as_it_gets_alone(folder, scheme):
    model, _ = load_model(folder, quantize=scheme)
    engine = Engine(model, vocab_tokenizer(), max_batch=4)
    for i, (user, method) in enumerate([("alice", slimtune.LoRA(rank=4)), ("bob", slimtune.LoRA(rank=4, alpha=8)),
                                        ("carol", slimtune.Adapter(size=8))]):
        engine.add(user, method)
        perturb(engine.bank.user_parameters(user), seed=i, scale=0.3)
    users = ["alice", None, "bob", "carol", "alice"]
    prompts = [[(5 * j + k) % 90 + 3 for k in range(3 + j)] for j in range(len(users))]
    handles = [engine.stream(u, p, max_new_tokens=6, keep_logits=True) for u, p in zip(users, prompts, strict=True)]
    mixed = [h.result() for h in handles]
    for user, p, got in zip(users, prompts, mixed, strict=True):
        alone = engine.generate(user, p, max_new_tokens=6, keep_logits=True)
        assert got.token_ids == alone.token_ids, user
        # bitsandbytes' CPU 4-bit matmul sums in an order that depends on the batch's shape and the threads free at
        # the time: a row in a batch of 4 and alone differ by up to ~2e-5 on a busy machine (1e-5 holds when quiet)
        torch.testing.assert_close(got.logits, alone.logits, atol=1e-4 if scheme == "nf4" else 1e-5, rtol=1e-5)
    # and each tuned row's first logits are what its tuning gives in a plain forward through the bank, not the base's
    with torch.no_grad():
        for j in (0, 3):
            ids = torch.tensor([prompts[j]])
            alone = engine.bank(input_ids=ids, users=[users[j]]).logits[0, -1]
            torch.testing.assert_close(mixed[j].logits[0], alone, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(alone, engine.bank(input_ids=ids, users=[None]).logits[0, -1], atol=1e-3)
    engine.close()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_merge_into_quantised_weights_fails_and_leaves_them_as_they_were(folder, scheme):
    model, _ = load_model(folder, quantize=scheme)
    tuned = slimtune.attach(model, slimtune.LoRA(rank=4))
    perturb(tuned.tuning_parameters())
    inputs = batch()
    with torch.no_grad():
        want = tuned(**inputs).logits
    before = frozen_weights(model)  # after a first inference, which may re-lay a 4-bit weight out (dense_weight)
    with pytest.raises((TuningError, RuntimeError, NotImplementedError)):
        tuned.merge()
    after = frozen_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(tuned(**inputs).logits, want)  # still served unmerged, as before


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_merge_into_quantised_weights_is_refused_in_words(folder, scheme):
    model, _ = load_model(folder, quantize=scheme)
    with pytest.raises(TuningError, match="quantised"):
        slimtune.attach(model, slimtune.LoRA(rank=4)).merge()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_model_tuning_and_dora_are_refused_over_a_quantised_base_with_what_to_do(folder, scheme):
    model, _ = load_model(folder, quantize=scheme)
    dense, _ = load_model(folder)
    for method, says in [(slimtune.FullFineTuning(), "model tuning trains every weight"),
                         (slimtune.DoRA(rank=4), "DoRA reads the norm")]:
        with pytest.raises(TuningError, match=says) as refused:
            quantize.check_method(method, model)
        assert "without quantize" in str(refused.value) and quantize.SCHEMES[scheme].description in str(refused.value)
        quantize.check_method(method, dense)  # the fp32 base takes both
    quantize.check_method(slimtune.LoRA(), model)


def test_an_unknown_scheme_is_refused_naming_the_ones_that_exist(folder):
    for bad in ("int4", "NF4", "4bit"):
        with pytest.raises(TuningError, match=r"quantize='.*' is not a quantisation scheme; use one of 'nf4' .*'int8'"):
            load_model(folder, quantize=bad)
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--method", "lora", "--task", "x.csv", "--out", "o", "--quantize", "int4"])
    with pytest.raises(SystemExit):
        compare.main(["--quantize", "fp8"])


def test_a_missing_backend_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(TuningError, match=r"needs the PyPI package bitsandbytes; install it with: pip install 'slimtune\[quant"):
        quantize.quantization_config("nf4")


def llama_folder(path):
    """A tiny random Llama with the word-level tokenizer of `tiny` (torchao quantises nn.Linear, not GPT-2's Conv1D)."""
    torch.manual_seed(0)
    quantisable_llama(vocab=len(WORDS)).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("scheme", SCHEMES)
def test_slimtune_train_and_eval_run_over_a_quantised_base(scheme, tmp_path, capsys):
    model = llama_folder(tmp_path / "model")
    data = sentiment_file(tmp_path / "data.csv")
    out = tmp_path / "run"
    assert cli_main(["train", "--model", str(model), "--method", "lora", "--task", str(data), "--out", str(out),
                     "--steps", "3", "--eval-every", "3", "--eval-examples", "8", "--quantize", scheme]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((out / "run.json").read_text())["quantize"] == scheme
    dense, _ = load_model(model)
    assert summary["parameters"]["total"] == summary["parameters"]["trainable"] + quantize.parameter_count(dense)
    assert cli_main(["eval", "--run", str(out), "--examples", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 8
    assert cli_main(["train", "--model", str(model), "--method", "full", "--task", str(data), "--out", str(tmp_path / "f"),
                     "--steps", "1", "--quantize", scheme]) == 2
    assert "model tuning trains every weight" in capsys.readouterr().err


def test_a_study_puts_each_configuration_on_each_base_side_by_side():
    specs = compare.specs_for(["m"], "t", None, ["full", "lora"], "quick", [0, 1], None, [None, "nf4"])
    assert [(s.method, s.seed, s.quantize) for s in specs] == [
        ("full", 0, None), ("full", 0, "nf4"), ("full", 1, None), ("full", 1, "nf4"),
        ("lora", 0, None), ("lora", 0, "nf4"), ("lora", 1, None), ("lora", 1, "nf4")]
    assert [s.label for s in specs[4:6]] == ["", "LoRA, nf4 base"]
    assert len({compare.run_name(s) for s in specs}) == len(specs)
    # a run recorded before the option existed is the same run as one on the base as stored
    plain = compare.asdict(specs[4])
    assert compare.identity({k: v for k, v in plain.items() if k != "quantize"}) == compare.identity(plain)
    assert compare.run_name(specs[4]) == "m-lora" and compare.run_name(specs[5]) == "m-nf4-lora"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_study_row_on_a_quantised_base_reports_its_memory_and_skips_model_tuning(scheme, tmp_path):
    model = llama_folder(tmp_path / "model")
    data, ood = sentiment_file(tmp_path / "data.csv"), sentiment_file(tmp_path / "ood.csv", seed=5)
    rows = {}
    for method, q in [("lora", None), ("lora", scheme), ("full", scheme)]:
        spec = compare.Spec(str(model), str(data), str(ood), method, "smoke", 0, quantize=q)
        rows[method, q] = compare.run_spec(spec, tmp_path / compare.run_name(spec))
    assert "model tuning trains every weight" in rows["full", scheme]["skipped"]
    dense, quantised = rows["lora", None], rows["lora", scheme]
    assert quantised["quantize"] == scheme and 0 <= quantised["in_distribution"] <= 1
    assert quantised["model_parameters"] == dense["model_parameters"] and quantised["share"] == dense["share"]
    assert quantised["model_bytes"] < dense["model_bytes"] and quantised["rss_after_load_bytes"] > 0


def test_gpt2s_conv1d_layers_are_quantised_by_nf4_and_refused_by_int8(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tmp_path / "gpt2"  # widths of whole 64-weight blocks, as `quantisable_llama`
    GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_positions=64, n_embd=64, n_layer=2, n_head=4)).save_pretrained(model)
    tokenizer().save_pretrained(model)
    if importlib.util.find_spec("bitsandbytes"):
        quantised, _ = load_model(model, quantize="nf4")
        assert quantize.scheme_of(quantised) == "nf4"
        assert all(quantize.is_quantised(m) for _, m in find_linears(quantised, r".*\.(c_attn|c_proj|c_fc)"))
    if importlib.util.find_spec("torchao"):
        with pytest.raises(TuningError, match=r"quantised no layer of .* takes nn.Linear layers, and this model's are Conv1D"):
            load_model(model, quantize="int8")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_nf4_weights_keep_the_layout_they_train_in_after_an_evaluation(folder, monkeypatch):
    """On CPUs with AVX512-BF16 (this one is made to claim it) bitsandbytes re-lays a 4-bit weight out at its first
    inference, for a kernel without a backward: training after an evaluation would get no gradient through it."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model, _ = load_model(folder, quantize="nf4")
    layers = [m for m in model.modules() if quantize.is_quantised(m)]
    inputs = batch()
    tuned = slimtune.attach(model, slimtune.LoRA(rank=4))
    perturb(tuned.tuning_parameters())
    with torch.no_grad():
        evaluated = tuned(**inputs).logits
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    tuned.train()
    trained = tuned(**inputs).logits
    torch.testing.assert_close(trained, evaluated, atol=1e-5, rtol=1e-5)
    trained.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tuned.tuning_parameters())
