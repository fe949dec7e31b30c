"""The core on an accelerator (skipped where there is none): tunings live on the model's device,
mixed batches still equal rows alone, half precision and training work there."""

import pytest
import torch

import slimtune

from conftest import DECODERS, build
from helpers import generated, methods_for, padded_batch, perturb, real_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def cuda_bank(arch, dtype=torch.float32):
    bank = slimtune.Bank(build(arch).to("cuda", dtype))
    for i, (user, method) in enumerate(methods_for(arch).items()):
        bank.add(user, method)
        perturb(bank.user_parameters(user), seed=i)
    return bank


@pytest.mark.parametrize("arch", DECODERS + ["t5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_batch_on_cuda(arch, dtype):
    bank = cuda_bank(arch, dtype)
    users = bank.users + [None]
    assert all(p.device.type == "cuda" and p.dtype == dtype for u in bank.users for p in bank.user_parameters(u))
    ids, mask = padded_batch(arch, [(3 + i % 4) for i in range(len(users))])
    ids, mask = ids.cuda(), mask.cuda()
    extra = {"decoder_input_ids": ids[:, :3].contiguous()} if arch == "t5" else {}
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        mixed = bank(input_ids=ids, attention_mask=mask, users=users, **extra).logits
        for b, user in enumerate(users):
            row_extra = {k: v[b : b + 1] for k, v in extra.items()}
            alone = bank(input_ids=real_tokens(ids, mask, b), users=[user], **row_extra).logits[0]
            want = alone if arch == "t5" else alone
            got = mixed[b] if arch == "t5" else mixed[b][mask[b].bool()]
            torch.testing.assert_close(got.float(), want.float(), atol=tol * max(1.0, want.abs().max().item()), rtol=0)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 1}
    out = bank.generate(input_ids=ids, attention_mask=mask, users=users, **kwargs)
    if dtype == torch.float32:
        start = 0 if arch == "t5" else ids.shape[1]  # T5 returns decoder tokens only
        for b, user in enumerate(users):
            row = real_tokens(ids, mask, b)
            alone = bank.generate(input_ids=row, users=[user], **kwargs)
            assert generated(out[b], start) == generated(alone[0], 0 if arch == "t5" else row.shape[1]), user


@pytest.mark.parametrize("arch", DECODERS)
def test_training_and_save_load_on_cuda(arch, tmp_path):
    model = build(arch).cuda()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    tuned = slimtune.attach(model, slimtune.PrefixTuning(length=4))
    optimizer = torch.optim.AdamW(tuned.tuning_parameters(), lr=0.05)
    ids = torch.randint(6, 90, (8, 6), device="cuda")
    labels = torch.full_like(ids, 5)
    losses = []
    for _ in range(20):
        loss = tuned(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    tuned.eval()
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
    tuned.save(tmp_path / "t")
    loaded = slimtune.load(build(arch).cuda(), tmp_path / "t")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
