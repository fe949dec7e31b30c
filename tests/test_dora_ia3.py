"""DoRA, IA3 and rsLoRA: where they start, what they train, that they mix row by row with every other
method (values and gradients), merge, and save."""

import pytest
import torch

import slimtune
from slimtune.methods import method_from_dict
from slimtune.methods.lora import weight_matrix

from conftest import BUILDERS, DECODERS, VOCAB, build
from helpers import methods_for, padded_batch, perturb, real_tokens

NEW = {
    "dora": slimtune.DoRA(rank=4),
    "ia3": slimtune.IA3(),
    "rslora": slimtune.LoRA(rank=4, rslora=True),
}


def extras(arch, ids, mask):
    extra = {"decoder_input_ids": ids[:, :3]} if arch == "t5" else {}
    if arch in DECODERS:  # slimtune derives positions from the mask, as generate() does
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return extra


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("kind", list(NEW))
def test_fresh_tunings_leave_logits_unchanged(arch, kind):
    model = build(arch)
    ids, mask = padded_batch(arch, [5, 3])
    tuned = slimtune.attach(model, NEW[kind])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, **extras(arch, ids, mask)).logits
        got = tuned(input_ids=ids, attention_mask=mask, **extras(arch, ids, mask)).logits
    assert torch.equal(got, want)


def test_trainable_parameters_follow_the_formula():
    d, n = 32, 2
    counts = {
        # GPT-2: LoRA on the fused c_attn (d -> 3d), DoRA adds a magnitude per output; IA3 scales c_attn's
        # 3d outputs and the 4d inputs of the feed-forward output layer.
        "gpt2": {"dora": n * (4 * (d + 3 * d) + 3 * d), "ia3": n * (3 * d + 4 * d)},
        # Llama: q_proj (d -> 32) and v_proj (d -> 16, 2 kv heads of 8); IA3 on k, v (16 each) and down_proj's 64 inputs.
        "llama": {"dora": n * (4 * (d + 32) + 32 + 4 * (d + 16) + 16), "ia3": n * (16 + 16 + 64)},
    }
    for arch, expected in counts.items():
        for kind, count in expected.items():
            tuned = slimtune.attach(build(arch), NEW[kind])
            assert sum(p.numel() for p in tuned.tuning_parameters()) == count, (arch, kind)
            assert slimtune.parameter_report(tuned).trainable == count


def test_rslora_scales_by_alpha_over_the_square_root_of_the_rank():
    assert slimtune.LoRA(rank=16, alpha=8, rslora=True).scale == 2.0
    assert slimtune.DoRA(rank=16, alpha=8, rslora=True).scale == 2.0
    # The same A and B under alpha / sqrt(4) = 8 / 2 compute what plain LoRA does under alpha / 4 = 16 / 4.
    model = build("llama")
    bank = slimtune.Bank(model)
    bank.add("rs", slimtune.LoRA(rank=4, alpha=8, rslora=True))
    perturb(bank.user_parameters("rs"), scale=0.3)
    bank.add("plain", (slimtune.LoRA(rank=4, alpha=16), bank.state("rs")))
    ids = padded_batch("llama", [5])[0].repeat(2, 1)
    with torch.no_grad():
        out = bank(input_ids=ids, users=["rs", "plain"]).logits
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)  # float rounding of two rows of one batched matmul


def test_dora_is_a_magnitude_times_the_updated_direction():
    """Merged, one layer's weight is m · (W + s·B·A) / ‖W + s·B·A‖ (row norms), computed here from scratch."""
    model = build("llama")
    tuned = slimtune.attach(model, slimtune.DoRA(rank=4, alpha=8, targets=["q_proj"]))
    perturb(tuned.tuning_parameters(), scale=0.3)
    name = "model.layers.0.self_attn.q_proj"
    state = tuned.bank.state("default")
    w = dict(model.named_modules())[name].weight.detach().clone()
    a, b, m = (state[f"{name}.{part}"] for part in ("lora_A", "lora_B", "magnitude"))
    updated = w + (8 / 4) * b @ a
    expected = m[:, None] * updated / updated.norm(dim=1, keepdim=True)
    tuned.merge()
    torch.testing.assert_close(dict(model.named_modules())[name].weight, expected, atol=1e-6, rtol=1e-5)
    tuned.unmerge()


@pytest.mark.parametrize("arch", DECODERS[:2])
@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_merge_gives_the_same_logits_and_unmerge_restores_the_weights(arch, kind):
    model = build(arch)
    tuned = slimtune.attach(model, NEW[kind])
    perturb(tuned.tuning_parameters(), scale=0.3)
    ids, mask = padded_batch(arch, [6, 4])
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, **extras(arch, ids, mask)).logits
        unmerged = tuned(input_ids=ids, attention_mask=mask).logits
        tuned.merge()
        merged = tuned(input_ids=ids, attention_mask=mask).logits
        plain = model(input_ids=ids, attention_mask=mask, **extras(arch, ids, mask)).logits  # the weights hold it now
        tuned.unmerge()
        again = tuned(input_ids=ids, attention_mask=mask).logits
    assert (unmerged - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain, unmerged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-4)
    for n, t in model.state_dict().items():
        torch.testing.assert_close(t, weights[n], atol=1e-6, rtol=1e-6)


def test_merging_needs_a_method_that_folds_into_the_weights():
    tuned = slimtune.attach(build("gpt2"), slimtune.Adapter(size=4))
    with pytest.raises(slimtune.TuningError, match="only LoRA, DoRA, IA3 can merge; this tuning is adapter"):
        tuned.merge()


# --- in a bank, beside every other method ------------------------------------------------------

def users_for(arch):
    """Every method of methods_for(), and two users each of DoRA and IA3 (the second ones of the same shapes, so
    they run stacked), and rsLoRA beside plain LoRA of the same rank (stacked with it)."""
    return methods_for(arch) | {
        "dora": slimtune.DoRA(rank=4), "dora2": slimtune.DoRA(rank=4, alpha=8, rslora=True),
        "dora8": slimtune.DoRA(rank=8, targets=None if arch != "llama" else ["q_proj", "k_proj"]),
        "ia3": slimtune.IA3(), "ia3b": slimtune.IA3(), "rslora": slimtune.LoRA(rank=4, rslora=True),
    }


def mixed_bank(arch):
    bank = slimtune.Bank(build(arch))
    for i, (user, method) in enumerate(users_for(arch).items()):
        bank.add(user, method)
        perturb(bank.user_parameters(user), seed=i, scale=0.3 if method.kind in ("dora", "ia3") else 0.1)
    return bank


USERS = ["dora", None, "ia3", "prefix3", "lora", "dora2", "prompt2", "ia3b", "rslora", "houlsby", "dora8", "bitfit",
         "dora", "ia3"]
# DoRA users of one rank only: their rows run through the stacked path, computed once for the batch.
STACKED = ["dora", "ia3", None, "dora2", "ia3b", "lora", "rslora", "dora", "prompt4", "ia3", "pfeiffer", "dora2", "bitfit2",
           "prefix5"]
LENGTHS = [5, 7, 3, 6, 7, 4, 2, 7, 5, 6, 4, 3, 6, 5]


def decoder_inputs(arch, batch):
    if arch != "t5":
        return {}
    return {"decoder_input_ids": torch.randint(2, VOCAB, (batch, 3), generator=torch.Generator().manual_seed(9))}


def rows_of(arch, logits, mask, b):
    return logits[b][mask[b].bool()] if arch in DECODERS else logits[b]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "t5"])
@pytest.mark.parametrize("users", [USERS, STACKED], ids=["looped", "stacked"])
def test_mixed_batch_equals_each_row_alone(arch, users):
    bank = mixed_bank(arch)
    ids, mask = padded_batch(arch, LENGTHS)
    extra = decoder_inputs(arch, len(users))
    with torch.no_grad():
        mixed = bank(input_ids=ids, attention_mask=mask, users=users, **extra).logits
        again = bank(input_ids=ids, attention_mask=mask, users=users, **extra).logits  # from values kept between calls
        assert torch.equal(again, mixed)
        base = bank(input_ids=ids, attention_mask=mask, users=[None] * len(users), **extra).logits
        for b, user in enumerate(users):
            row_extra = {k: v[b : b + 1] for k, v in extra.items()}
            alone = bank(input_ids=real_tokens(ids, mask, b), users=[user], **row_extra).logits
            torch.testing.assert_close(rows_of(arch, mixed, mask, b), alone[0], atol=1e-5, rtol=1e-4)
            if user is not None:  # and the tuning does something
                assert (rows_of(arch, mixed, mask, b) - rows_of(arch, base, mask, b)).abs().max() > 1e-3, user


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bank_training_gives_each_user_gradient_from_their_rows_only(arch):
    bank = mixed_bank(arch)
    bank.train()
    users = ["dora", "ia3", "lora", "dora2", None, "ia3b", "prefix3", "dora", "rslora", "ia3"]
    ids, mask = padded_batch(arch, [5, 4, 6, 3, 6, 5, 4, 2, 6, 5])

    def grads(loss):
        bank.zero_grad(set_to_none=True)
        loss.backward()
        return {u: [None if p.grad is None else p.grad.clone() for p in bank.user_parameters(u)] for u in bank.users}

    def per_row(out, row_mask):
        return (out.logits.float().pow(2) * row_mask[..., None]).flatten(1).sum(1)

    # Loss from the other users' rows only: the user gets exactly zero gradient, a user of the same method some.
    for user, other in [("dora", "dora2"), ("ia3", "ia3b")]:
        others = torch.tensor([u != user for u in users])
        g = grads(per_row(bank(input_ids=ids, attention_mask=mask, users=users), mask)[others].sum())
        assert all(x is None or torch.all(x == 0) for x in g[user]), user
        assert any(x is not None and x.abs().sum() > 0 for x in g[other]), other

    # And each user's gradient from the mixed batch equals their gradient from their rows alone.

    mixed = grads(per_row(bank(input_ids=ids, attention_mask=mask, users=users), mask).sum())
    for user in ["dora", "dora2", "ia3", "ia3b", "rslora"]:
        alone_loss = 0
        for b in [b for b, u in enumerate(users) if u == user]:
            row = real_tokens(ids, mask, b)
            alone_loss = alone_loss + per_row(bank(input_ids=row, users=[user]), torch.ones_like(row)).sum()
        alone = grads(alone_loss)[user]
        assert any(a is not None and a.abs().sum() > 0 for a in alone), user
        for a, m in zip(alone, mixed[user], strict=True):
            torch.testing.assert_close(m, a, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_new_methods_learn_and_leave_the_base_untouched(kind):
    model = build("llama")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    tuned = slimtune.attach(model, NEW[kind])
    ids = torch.randint(6, VOCAB, (8, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.full_like(ids, 5)}
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=0.02 if kind == "dora" else 0.1)
    tuned.train()
    losses = []
    for _ in range(30):
        loss = tuned(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


# --- saved, configured ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(NEW))
def test_a_saved_tuning_reloads_to_the_same_logits(tmp_path, kind):
    tuned = slimtune.attach(build("gpt2"), NEW[kind])
    perturb(tuned.tuning_parameters(), scale=0.3)
    ids, mask = padded_batch("gpt2", [6, 3])
    loaded = slimtune.load(build("gpt2"), tuned.save(tmp_path / kind))
    assert loaded.method == NEW[kind]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, tuned(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("method", [
    slimtune.DoRA(rank=2, alpha=4.0, dropout=0.1, targets=["q_proj"], rslora=True),
    slimtune.LoRA(rank=2, rslora=True),
    slimtune.IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"]),
    slimtune.IA3(targets=r".*\.(k|v)_proj", feedforward=()),
], ids=["dora", "rslora", "ia3", "ia3-regex"])
def test_configs_survive_their_saved_form(method):
    assert method_from_dict(method.to_dict()) == method
    resolved = method.resolve(build("llama"))
    assert method_from_dict(resolved.to_dict()) == resolved and resolved.resolve(build("llama")) == resolved


@pytest.mark.parametrize("record", [
    {"kind": "lora", "rslora": "yes"},
    {"kind": "dora", "rank": 2.5},
    {"kind": "ia3", "feedforward": 3},
    {"kind": "ia3", "scales": [1, 2]},
])
def test_wrongly_typed_settings_are_refused(record):
    with pytest.raises(slimtune.TuningFileError, match="bad settings"):
        method_from_dict(record)


def test_ia3_feedforward_decides_input_or_output():
    model = build("llama")
    sites = slimtune.IA3().resolve(model)
    assert sites.feedforward == ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    # Without feedforward layers, down_proj's vector scales its 32 outputs instead of its 64 inputs.
    tuned = slimtune.attach(model, slimtune.IA3(targets=["down_proj"], feedforward=()))
    assert [p.numel() for p in tuned.tuning_parameters()] == [32, 32]
    tuned.bank.detach()
    with pytest.raises(slimtune.TuningError, match="feedforward selects 'model.layers.0.mlp.up_proj', which is not one"):
        slimtune.attach(build("llama"), slimtune.IA3(targets=["k_proj"], feedforward=["up_proj"]))
    bank = slimtune.Bank(build("llama"))
    bank.add("a", slimtune.IA3(targets=["down_proj"]))
    with pytest.raises(slimtune.TuningError, match="must agree on which layers are feed-forward"):
        bank.add("b", slimtune.IA3(targets=["down_proj"], feedforward=()))


def test_dora_on_the_weights_that_it_would_rescale():
    """DoRA's magnitude starts as each output row's norm of the frozen weight (GPT-2's Conv1D transposed)."""
    model = build("gpt2")
    tuned = slimtune.attach(model, slimtune.DoRA(rank=2))
    name = "transformer.h.0.attn.c_attn"
    magnitude = tuned.bank.state("default")[f"{name}.magnitude"]
    assert torch.equal(magnitude, weight_matrix(dict(model.named_modules())[name]).norm(dim=1))
    assert magnitude.shape == (96,)
