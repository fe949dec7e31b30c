"""A bank serves many users' tunings mixed row by row: each row must come out as if run alone."""

import pytest
import torch

import slimtune

from conftest import DECODERS, VOCAB, build
from helpers import generated, methods_for, padded_batch, perturb, real_tokens


def mixed_bank(arch):
    model = build(arch)
    bank = slimtune.Bank(model)
    for i, (user, method) in enumerate(methods_for(arch).items()):
        bank.add(user, method)
        perturb(bank.user_parameters(user), seed=i)
    return bank


USERS = ["lora", None, "prefix3", "prompt2", "houlsby", "prefix5", "prompt4", "bitfit", "pfeiffer", "lora", None,
         "lora2", "houlsby2", "bitfit2"]
LENGTHS = [5, 7, 3, 6, 7, 4, 2, 7, 5, 6, 4, 3, 6, 5]


def decoder_ids(arch, batch, seed=9):
    if arch != "t5":
        return {}
    g = torch.Generator().manual_seed(seed)
    return {"decoder_input_ids": torch.randint(2, VOCAB, (batch, 3), generator=g)}


def test_mixed_batch_equals_each_row_alone(arch):
    bank = mixed_bank(arch)
    ids, mask = padded_batch(arch, LENGTHS)
    extra = decoder_ids(arch, len(LENGTHS))
    with torch.no_grad():
        mixed = bank(input_ids=ids, attention_mask=mask, users=USERS, **extra).logits
        for b, user in enumerate(USERS):
            row_extra = {k: v[b : b + 1] for k, v in extra.items()}
            alone = bank(input_ids=real_tokens(ids, mask, b), users=[user], **row_extra).logits
            if arch in ("bert",):  # sequence classification: one row of class logits
                torch.testing.assert_close(mixed[b], alone[0], atol=1e-5, rtol=1e-4)
            elif arch == "t5":  # logits are over the decoder tokens
                torch.testing.assert_close(mixed[b], alone[0], atol=1e-5, rtol=1e-4)
            else:
                torch.testing.assert_close(mixed[b][mask[b].bool()], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grad", [False, True])
def test_same_shaped_users_run_stacked(monkeypatch, grad):
    """Users of one method with equal shapes are computed in one gathered batch, not a loop over users: from the
    slot tables in inference, from the users' own parameters in training."""
    from slimtune.methods.base import SiteComponent

    looped = []
    for cls in {type(part) for part in mixed_bank("llama").parts.values()}:
        if issubclass(cls, SiteComponent) and cls.kind != "head":
            original = cls.site_value
            monkeypatch.setattr(cls, "site_value", lambda self, *a, _o=original: looped.append(self.kind) or _o(self, *a))
    bank = mixed_bank("llama")
    ids, mask = padded_batch("llama", [4, 4, 4, 4, 4, 4])
    with torch.set_grad_enabled(grad):
        out = bank(input_ids=ids, attention_mask=mask, users=["lora", "lora2", "houlsby", "houlsby2", "bitfit", "bitfit2"])
    assert looped == []
    assert out.logits.requires_grad == grad


def test_rows_differ_between_users(arch):
    """The check above would pass if tunings were ignored: make sure each user changes the output."""
    bank = mixed_bank(arch)
    ids, mask = padded_batch(arch, [6])
    extra = decoder_ids(arch, 1)
    with torch.no_grad():
        base = bank(input_ids=ids, attention_mask=mask, users=[None], **extra).logits
        for user in bank.users:
            tuned = bank(input_ids=ids, attention_mask=mask, users=[user], **extra).logits
            assert (tuned - base).abs().max() > 1e-4, user


@pytest.mark.parametrize("arch", DECODERS + ["t5"])
def test_mixed_generation_equals_each_row_alone(arch):
    bank = mixed_bank(arch)
    users = ["lora", None, "prefix3", "prompt2", "houlsby", "prefix5", "prompt4", "bitfit"]
    ids, mask = padded_batch(arch, [5, 3, 4, 5, 2, 3, 5, 4])
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 1}
    mixed = bank.generate(input_ids=ids, attention_mask=mask, users=users, **kwargs)
    start = 0 if arch == "t5" else ids.shape[1]  # T5 returns decoder tokens only
    for b, user in enumerate(users):
        row = real_tokens(ids, mask, b)
        alone = bank.generate(input_ids=row, users=[user], **kwargs)
        assert generated(mixed[b], start) == generated(alone[0], 0 if arch == "t5" else row.shape[1]), user
        assert len(generated(alone[0], 0 if arch == "t5" else row.shape[1])) > 0


def test_mixed_generation_with_beams_and_several_returns():
    bank = mixed_bank("llama")
    users = ["prefix3", "prompt2", None]
    ids, mask = padded_batch("llama", [4, 3, 5])
    kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "num_return_sequences": 2, "pad_token_id": 1}
    mixed = bank.generate(input_ids=ids, attention_mask=mask, users=users, **kwargs)
    assert mixed.shape[0] == 6
    for b, user in enumerate(users):
        alone = bank.generate(input_ids=real_tokens(ids, mask, b), users=[user], **kwargs)
        assert mixed[2 * b : 2 * b + 2, -4:].tolist() == alone[:, -4:].tolist(), user


def test_bank_training_keeps_users_apart(arch):
    """A mixed batch updates each user's parameters from that user's rows only."""
    bank = mixed_bank(arch)
    bank.train()
    users = ["lora", "prefix5", "prompt2", "houlsby", "lora", "bitfit", None, "prompt2", "lora2", "houlsby2", "bitfit2"]
    ids, mask = padded_batch(arch, [5, 4, 6, 3, 6, 5, 4, 2, 6, 5, 4])
    extra = decoder_ids(arch, len(users))

    def grads(loss):
        bank.zero_grad(set_to_none=True)
        loss.backward()
        return {u: [None if p.grad is None else p.grad.clone() for p in bank.user_parameters(u)] for u in bank.users}

    def per_row(out, row_mask=None):
        squares = out.logits.float().pow(2)
        if arch in DECODERS:  # padded positions are not part of a row's result
            squares = squares * (mask if row_mask is None else row_mask)[..., None]
        return squares.flatten(1).sum(1)

    # Loss from the other users' rows only: user "lora" must get exactly zero gradient.
    out = bank(input_ids=ids, attention_mask=mask, users=users, **extra)
    others = torch.tensor([u != "lora" for u in users])
    g = grads(per_row(out)[others].sum())
    assert all(x is None or torch.all(x == 0) for x in g["lora"])
    assert any(x is not None and x.abs().sum() > 0 for x in g["prompt2"])

    # And each user's gradient from the mixed batch equals their gradient from their rows alone.
    out = bank(input_ids=ids, attention_mask=mask, users=users, **extra)
    mixed = grads(per_row(out).sum())
    for user in ["lora", "prefix5", "prompt2", "bitfit", "lora2", "houlsby2", "bitfit2"]:
        rows = [b for b, u in enumerate(users) if u == user]
        alone_loss = 0
        for b in rows:
            row_extra = {k: v[b : b + 1] for k, v in extra.items()}
            row = real_tokens(ids, mask, b)
            out = bank(input_ids=row, users=[user], **row_extra)
            alone_loss = alone_loss + per_row(out, torch.ones_like(row)).sum()
        alone = grads(alone_loss)[user]
        for a, m in zip(alone, mixed[user], strict=True):
            torch.testing.assert_close(m, a, atol=1e-4, rtol=1e-3)


def test_unknown_user_is_named():
    bank = mixed_bank("gpt2")
    ids, mask = padded_batch("gpt2", [3, 3])
    with pytest.raises(slimtune.UnknownUserError, match="unknown user 'zoe'.*lora"):
        bank(input_ids=ids, attention_mask=mask, users=["lora", "zoe"])
    with pytest.raises(slimtune.TuningError, match="2 rows"):
        bank(input_ids=ids, attention_mask=mask, users=["lora"])
    with pytest.raises(slimtune.TuningError, match="already in this bank"):
        bank.add("lora", slimtune.LoRA())


def test_removed_user_is_gone_and_others_unchanged():
    bank = mixed_bank("gpt2")
    ids, mask = padded_batch("gpt2", [4])
    with torch.no_grad():
        before = bank(input_ids=ids, attention_mask=mask, users=["prompt2"]).logits
        bank.remove("prefix5")
        after = bank(input_ids=ids, attention_mask=mask, users=["prompt2"]).logits
    torch.testing.assert_close(before, after)
    with pytest.raises(slimtune.UnknownUserError):
        bank(input_ids=ids, attention_mask=mask, users=["prefix5"])


def test_checking_a_saved_full_fine_tune_leaves_the_model_as_it_was():
    """`Bank.check` builds a tuning and lets it go: for a full fine-tune (which is built by writing the model's
    weights) it must not write them, even on a bank that could take one."""
    source = slimtune.Bank(build(DECODERS[0]))
    source.add("x", slimtune.FullFineTuning())
    state = {name: t + 0.5 for name, t in source.state("x").items()}
    model = build(DECODERS[0])
    before = {name: t.clone() for name, t in model.state_dict().items()}
    slimtune.Bank(model).check(slimtune.FullFineTuning(), state)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


def test_full_fine_tuning_cannot_share_a_bank():
    bank = slimtune.Bank(build("gpt2"))
    bank.add("a", slimtune.LoRA())
    with pytest.raises(slimtune.TuningError, match="full fine-tune"):
        bank.add("b", slimtune.FullFineTuning())


def test_base_rows_equal_the_untouched_model(arch):
    bank = mixed_bank(arch)
    ids, mask = padded_batch(arch, [4, 4])
    extra = decoder_ids(arch, 2)
    with torch.no_grad():
        got = bank(input_ids=ids, attention_mask=mask, users=[None, "lora"], **extra).logits[0]
        bank.detach()
        want = bank.model(input_ids=ids, attention_mask=mask, **extra).logits[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_parameters_kept_between_inference_calls_follow_every_change(arch):
    """Inference keeps each batch layout's gathered parameters between calls; an in-place change
    (an optimizer step, a load) must be seen at once."""
    bank = mixed_bank(arch)
    ids, mask = padded_batch(arch, LENGTHS)
    optimizer = torch.optim.SGD(bank.user_parameters("lora2"), lr=0.5)
    for change in range(3):
        with torch.no_grad():
            kept = bank(input_ids=ids, attention_mask=mask, users=USERS).logits
            again = bank(input_ids=ids, attention_mask=mask, users=USERS).logits
        fresh = bank(input_ids=ids, attention_mask=mask, users=USERS).logits  # grad enabled: nothing kept
        torch.testing.assert_close(kept, fresh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again, kept, atol=0, rtol=0)
        if change == 0:
            perturb(bank.user_parameters("prefix3"), seed=50)  # in place, under no_grad
            perturb(bank.user_parameters("houlsby2"), seed=51)
        else:
            fresh[USERS.index("lora2")].sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            changed = bank(input_ids=ids, attention_mask=mask, users=USERS).logits
        assert not torch.allclose(changed, kept)
