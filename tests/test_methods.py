"""Each method on each architecture: what trains, how much, that it starts where it should and learns."""

import pytest
import torch

import slimtune

from conftest import BUILDERS, DECODERS, VOCAB, build
from helpers import bitfit_for, padded_batch

ALL = list(BUILDERS)


def self_attention_layers(arch, model):
    c = model.config
    return c.num_layers + c.num_decoder_layers if arch == "t5" else c.num_hidden_layers


def kv_width(arch, model):
    """kv_heads * head_dim: the width of one prefix key (or value) vector."""
    c = model.config
    if arch in ("llama", "gemma3"):
        return c.num_key_value_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    if arch == "t5":
        return c.num_heads * c.d_kv
    return c.hidden_size


def expected_count(arch, method, model):
    d = model.get_input_embeddings().weight.shape[1]
    n = self_attention_layers(arch, model)
    if isinstance(method, slimtune.PromptTuning):
        return method.length * d
    if isinstance(method, slimtune.PrefixTuning):
        p = n * 2 * kv_width(arch, model)  # per prefix position
        if method.reparam is None:
            return method.length * p
        h = method.mlp_hidden
        return method.length * d + (d * h + h) + (h * p + p)
    if isinstance(method, slimtune.Adapter):
        sites = n * (2 if method.placement == "houlsby" else 1)
        return sites * (2 * d * method.size + method.size + d)
    if isinstance(method, slimtune.LoRA):
        r = method.rank
        if arch == "gpt2":
            return n * r * (d + 3 * d)  # fused c_attn: d -> 3d
        if arch in ("llama", "gemma3"):
            q_width = model.config.num_attention_heads * model.config.head_dim  # Gemma's need not be d
            return n * (r * (d + q_width) + r * (d + kv_width(arch, model)))  # q_proj, v_proj
        if arch == "bert":
            return n * 2 * r * (d + d)  # query, value
        inner = model.config.num_heads * model.config.d_kv
        attentions = model.config.num_layers + 2 * model.config.num_decoder_layers  # self + cross in the decoder
        return attentions * 2 * r * (d + inner)  # q and v
    if isinstance(method, slimtune.BitFit):
        biases = sum(m.bias.numel() for m in model.modules() if isinstance(getattr(m, "bias", None), torch.nn.Parameter))
        if method.add_missing:
            from slimtune.modules import body_modules, is_linear, linear_features
            biases += sum(linear_features(m)[1] for _, m in body_modules(model) if is_linear(m) and m.bias is None)
        if arch == "bert":
            biases -= model.classifier.bias.numel()  # the head trains whole, counted below
        return biases
    if isinstance(method, slimtune.FullFineTuning):
        return sum(p.numel() for p in model.parameters())
    raise AssertionError(method)


def head_count(arch, model):
    return model.classifier.weight.numel() + model.classifier.bias.numel() if arch == "bert" else 0


def methods(arch):
    return [
        slimtune.PromptTuning(length=7),
        slimtune.PrefixTuning(length=4, reparam=None),
        slimtune.PrefixTuning(length=4, mlp_hidden=16),
        slimtune.Adapter(size=8),
        slimtune.Adapter(size=4, placement="pfeiffer"),
        slimtune.LoRA(rank=4),
        bitfit_for(arch),
        slimtune.FullFineTuning(),
    ]


@pytest.mark.parametrize("arch", ALL)
def test_trainable_parameters_follow_the_formula(arch):
    for method in methods(arch):
        model = build(arch)
        expected = expected_count(arch, method, model)
        if not isinstance(method, slimtune.FullFineTuning):
            expected += head_count(arch, model)
        tuned = slimtune.attach(model, method)
        report = slimtune.parameter_report(tuned)
        assert report.trainable == expected, method
        assert sum(p.numel() for p in tuned.tuning_parameters()) == expected, method
        assert 0 < report.share <= 1


def test_bitfit_on_a_model_without_biases_is_an_error_not_a_no_op():
    with pytest.raises(slimtune.TuningError, match="no bias terms.*add_missing=True"):
        slimtune.attach(build("llama"), slimtune.BitFit())


@pytest.mark.parametrize("arch", ALL)
@pytest.mark.parametrize("method", [slimtune.Adapter(size=8), slimtune.Adapter(size=8, placement="pfeiffer"),
                                    slimtune.LoRA(rank=4), "bitfit"], ids=["houlsby", "pfeiffer", "lora", "bitfit"])
def test_zero_initialised_tunings_leave_logits_unchanged(arch, method):
    model = build(arch)
    method = bitfit_for(arch) if method == "bitfit" else method
    ids, mask = padded_batch(arch, [5, 3])
    extra = {"decoder_input_ids": ids[:, :3]} if arch == "t5" else {}
    if arch in DECODERS:  # slimtune derives positions from the mask, as generate() does
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    tuned = slimtune.attach(model, method)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, **extra).logits
        got = tuned(input_ids=ids, attention_mask=mask, **extra).logits
    assert torch.equal(got, want)


def toy_batch(arch, seed=0):
    """A fixed toy task any method can learn: answer token 5 (or class 2) whatever the input."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (8, 6), generator=g)
    if arch == "bert":
        return {"input_ids": ids, "labels": torch.full((8,), 2)}
    return {"input_ids": ids, "labels": torch.full_like(ids, 5)}


LEARNING_RATES = {"prompt": 0.3, "prefix": 0.05, "adapter": 0.02, "lora": 0.02, "bitfit": 0.05, "full": 0.003}


def train(tuned, batch, steps, lr):
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.1)
    tuned.train()
    losses = []
    for _ in range(steps):
        loss = tuned(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ALL)
def test_every_method_learns_and_only_full_fine_tuning_touches_the_base(arch):
    for method in methods(arch):
        model = build(arch)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        tuned = slimtune.attach(model, method)
        losses = train(tuned, toy_batch(arch), steps=30, lr=LEARNING_RATES[method.kind])
        assert losses[-1] < 0.5 * losses[0], (method, losses[0], losses[-1])
        after = model.state_dict()
        unchanged = all(torch.equal(before[n], after[n]) for n in before)
        assert unchanged != isinstance(method, slimtune.FullFineTuning), method


def test_frozen_weights_get_no_gradient():
    model = build("llama")
    tuned = slimtune.attach(model, slimtune.PrefixTuning(length=3))
    tuned(**toy_batch("llama")).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in tuned.tuning_parameters())


@pytest.mark.parametrize("bad", [
    lambda: slimtune.PromptTuning(length=0),
    lambda: slimtune.PrefixTuning(length=0),
    lambda: slimtune.LoRA(rank=0),
    lambda: slimtune.Adapter(size=0),
    lambda: slimtune.Adapter(placement="middle"),
    lambda: slimtune.PromptTuning(init="labels"),
    lambda: slimtune.PrefixTuning(reparam="lstm"),
])
def test_bad_settings_are_refused_with_the_reason(bad):
    with pytest.raises(slimtune.TuningError, match="must|needs"):
        bad()


def test_a_prompt_longer_than_the_models_positions_is_refused_before_any_forward():
    model = build("gpt2")
    positions = model.config.max_position_embeddings
    with pytest.raises(slimtune.TuningError, match=f"length={positions}.*{positions} positions"):
        slimtune.attach(model, slimtune.PromptTuning(length=positions))
    tuned = slimtune.attach(model, slimtune.PromptTuning(length=positions - 1))
    assert tuned.bank.parts["prompt"].tuning("default").prompt.shape[0] == positions - 1


def test_lora_target_that_matches_nothing_names_the_layers():
    with pytest.raises(slimtune.TuningError, match="'qkv'.*c_attn"):
        slimtune.attach(build("gpt2"), slimtune.LoRA(targets=["qkv"]))


def test_lora_targets_by_suffix_and_by_regex():
    model = build("llama")
    tuned = slimtune.attach(model, slimtune.LoRA(rank=2, targets=["k_proj", "o_proj"]))
    assert sorted({n.rsplit(".", 1)[-1] for n in tuned.bank.parts["lora"].tuning("default").names}) == ["k_proj", "o_proj"]
    tuned.bank.detach()
    tuned = slimtune.attach(model, slimtune.LoRA(rank=2, targets=r".*layers\.0\.mlp\.(up|gate)_proj"))
    assert len(tuned.bank.parts["lora"].tuning("default").names) == 2


@pytest.mark.parametrize("arch", DECODERS)
def test_lora_merge_gives_the_same_logits_at_no_extra_cost(arch):
    model = build(arch)
    tuned = slimtune.attach(model, slimtune.LoRA(rank=4))
    train(tuned, toy_batch(arch), steps=3, lr=0.05)
    tuned.eval()
    ids, mask = padded_batch(arch, [6, 4])
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        unmerged = tuned(input_ids=ids, attention_mask=mask).logits
        tuned.merge()
        merged = tuned(input_ids=ids, attention_mask=mask).logits
        plain = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        tuned.unmerge()
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain, unmerged, atol=1e-5, rtol=1e-4)
    for n, t in model.state_dict().items():
        torch.testing.assert_close(t, weights[n], atol=1e-6, rtol=0)


def test_merge_needs_lora():
    tuned = slimtune.attach(build("gpt2"), slimtune.Adapter(size=4))
    with pytest.raises(slimtune.TuningError, match="only LoRA"):
        tuned.merge()
