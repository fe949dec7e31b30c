"""init="text": a prompt or prefix made from a real text makes the tuned model behave exactly as
the frozen model run on that text followed by the input (decoders)."""

import pytest
import torch

import slimtune

from conftest import DECODERS, VOCAB, build


class IdTokenizer:
    """Maps a text of space-separated integers to those token ids."""

    all_special_ids: list[int] = []

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def convert_ids_to_tokens(self, i):
        return f"t{i}"


TEXT_IDS = [11, 42, 7, 63, 20]
TEXT = " ".join(map(str, TEXT_IDS))


def frozen_on_text_plus(model, ids, mask):
    """The frozen model run on [text, x] for each row, logits of the x part."""
    k = len(TEXT_IDS)
    text = torch.tensor(TEXT_IDS).expand(ids.shape[0], k)
    full_mask = torch.cat([torch.ones(ids.shape[0], k, dtype=mask.dtype), mask], 1)
    # Left-padded rows: move padding in front of the text so the text touches the input.
    rows = []
    for b in range(ids.shape[0]):
        real = ids[b][mask[b].bool()]
        pad = ids.shape[1] - len(real)
        seq = torch.cat([torch.full((pad,), 1), text[b], real])
        rows.append(seq)
    seqs = torch.stack(rows)
    full_mask = (torch.arange(seqs.shape[1])[None] >= (ids.shape[1] - mask.sum(1))[:, None]).long()
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=seqs, attention_mask=full_mask, position_ids=positions).logits
    return logits[:, k:]


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("method", [
    slimtune.PromptTuning(length=5, init="text", text=TEXT),
    slimtune.PrefixTuning(length=5, init="text", text=TEXT, reparam=None),
    slimtune.PrefixTuning(length=5, init="text", text=TEXT, reparam="mlp"),
], ids=["prompt", "prefix", "prefix-mlp"])
def test_text_init_equals_frozen_model_on_text_plus_input(arch, method):
    model = build(arch)
    ids = torch.randint(2, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])  # left padding
    expected = frozen_on_text_plus(model, ids, mask)
    tuned = slimtune.attach(model, method, tokenizer=IdTokenizer())
    with torch.no_grad():
        got = tuned(input_ids=ids, attention_mask=mask).logits
    assert got.shape == (3, 6, VOCAB)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_text_init_generation_equals_generation_after_text(arch, kind):
    model = build(arch)
    ids = torch.randint(2, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    ids[1, 0] = 1
    cls = slimtune.PromptTuning if kind == "prompt" else slimtune.PrefixTuning
    extra = {} if kind == "prompt" else {"reparam": None}
    tuned = slimtune.attach(model, cls(length=5, init="text", text=TEXT, **extra), tokenizer=IdTokenizer())
    got = tuned.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1)
    tuned.bank.detach()
    text = torch.tensor(TEXT_IDS)
    for b in range(2):
        real = ids[b][mask[b].bool()]
        alone = model.generate(input_ids=torch.cat([text, real])[None], max_new_tokens=6, do_sample=False, pad_token_id=1)
        assert got[b, -6:].tolist() == alone[0, -6:].tolist()
        assert got[b, :4].tolist() == ids[b].tolist()
