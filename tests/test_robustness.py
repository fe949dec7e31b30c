"""The conditions real use brings: right padding, the KV cache, gradient checkpointing, eager
attention, half precision."""

import pytest
import torch

import slimtune

from conftest import DECODERS, VOCAB, build
from helpers import methods_for, padded_batch, perturb, real_tokens


def bank_of(arch, dtype=torch.float32):
    model = build(arch).to(dtype)
    bank = slimtune.Bank(model)
    for i, (user, method) in enumerate(methods_for(arch).items()):
        bank.add(user, method)
        perturb(bank.user_parameters(user), seed=i)
    return bank


@pytest.mark.parametrize("arch", DECODERS)
def test_right_padded_decoder_rows_equal_rows_alone(arch):
    bank = bank_of(arch)
    users = ["prefix3", "prompt4", "lora", None]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (4, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        mixed = bank(input_ids=ids, attention_mask=mask, users=users).logits
        for b, user in enumerate(users):
            alone = bank(input_ids=real_tokens(ids, mask, b), users=[user]).logits[0]
            torch.testing.assert_close(mixed[b][mask[b].bool()], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", DECODERS)
def test_generation_with_the_cache_equals_generation_without(arch):
    bank = bank_of(arch)
    users = ["prefix5", "prompt2", "houlsby", "lora"]
    ids, mask = padded_batch(arch, [5, 3, 4, 2])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 1}
    cached = bank.generate(input_ids=ids, attention_mask=mask, users=users, **kwargs)
    uncached = bank.generate(input_ids=ids, attention_mask=mask, users=users, use_cache=False, **kwargs)
    assert cached.tolist() == uncached.tolist()


@pytest.mark.parametrize("arch", DECODERS)
def test_eager_attention_gives_the_same_result_as_sdpa(arch):
    ids, mask = padded_batch(arch, [6, 4, 5])
    users = ["prefix3", "prefix5", None]
    outs = []
    for implementation in ["sdpa", "eager"]:
        bank = bank_of(arch)
        bank.model.set_attn_implementation(implementation)
        bank.detach()
        bank = slimtune.Bank(bank.model)
        for i, (user, method) in enumerate(methods_for(arch).items()):
            bank.add(user, method)
            torch.manual_seed(i)
            perturb(bank.user_parameters(user), seed=i)
        with torch.no_grad():
            outs.append(bank(input_ids=ids, attention_mask=mask, users=users).logits)
        assert bank.model.config._attn_implementation == f"slimtune_{implementation}"
    for b in range(3):
        torch.testing.assert_close(outs[0][b][mask[b].bool()], outs[1][b][mask[b].bool()], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", DECODERS)
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    ids, mask = padded_batch(arch, [6, 4, 5, 6])
    users = ["prefix5", "prompt2", "lora", "houlsby"]
    grads = []
    for checkpointing in [False, True]:
        bank = bank_of(arch)
        if checkpointing:
            bank.model.activation_checkpointing_enable()
        bank.train()
        out = bank(input_ids=ids, attention_mask=mask, users=users, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads.append({u: [p.grad.clone() for p in bank.user_parameters(u)] for u in users})
    for user in users:
        for a, b in zip(grads[0][user], grads[1][user], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "t5"])
def test_half_precision_runs_in_the_model_dtype(arch, dtype):
    bank = bank_of(arch, dtype)
    assert all(p.dtype == dtype for u in bank.users for p in bank.user_parameters(u))
    full = bank_of(arch)
    users = bank.users
    ids, mask = padded_batch(arch, [5, 3, 4, 5, 4, 5, 3, 4, 5, 2, 4][: len(users)])
    extra = {"decoder_input_ids": ids[:, :3]} if arch == "t5" else {}
    with torch.no_grad():
        half = bank(input_ids=ids, attention_mask=mask, users=users, **extra).logits
        ref = full(input_ids=ids, attention_mask=mask, users=users, **extra).logits
    assert half.dtype == dtype
    assert torch.isfinite(half).all()
    # Same tunings (the same seeds), so half precision must land near the fp32 result.
    assert (half.float() - ref).abs().max() < 0.15 * ref.abs().max()
    out = bank.generate(input_ids=ids, attention_mask=mask, users=users, max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert out.shape[0] == len(users)
    bank.train()
    labels = extra.pop("decoder_input_ids").contiguous() if arch == "t5" else ids
    loss = bank(input_ids=ids, attention_mask=mask, users=users, labels=labels, **extra).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in bank.user_parameters("prefix3"))
