"""The core on the real Gemma 3 270M (opt-in asset: `bash scripts/install-assets.sh --gemma`): q/k norms,
embeddings scaled by sqrt(640), one key/value head of 256, sliding-window layers (512) beside full ones,
a 262,144-token vocabulary and tied embeddings."""

import pytest
import torch

import slimtune

pytestmark = pytest.mark.integration


def _load(name, **kwargs):
    from slimtune.assets import MissingAssetError
    from slimtune.models import load_model

    try:
        return load_model(name, **kwargs)
    except MissingAssetError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def gemma():
    return _load("gemma3-270m")


# Gemma is trained with <bos> first; the text starts with it, so the tuned model stands in for [<bos>, text, x].
TEXT = "<bos>The following review is about a film."
REVIEWS = ["A gripping, beautifully shot thriller.", "Dull.", "I laughed, I cried, I left early."]


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_text_init_on_gemma3_equals_the_model_on_text_plus_input(gemma, kind):
    model, tokenizer = gemma
    text = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    k = len(text)
    method = (slimtune.PromptTuning(length=k, init="text", text=TEXT) if kind == "prompt"
              else slimtune.PrefixTuning(length=k, init="text", text=TEXT, reparam=None))
    tuned = slimtune.attach(model, method, tokenizer=tokenizer)
    try:
        for review in REVIEWS:
            x = tokenizer(" " + review, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                got = tuned(input_ids=torch.tensor([x])).logits[0]
                want = model(input_ids=torch.tensor([text + x])).logits[0, k:]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        tuned.bank.detach()


def test_a_mixed_batch_on_gemma3_equals_each_row_alone(gemma):
    model, tokenizer = gemma
    bank = slimtune.Bank(model, tokenizer)
    torch.manual_seed(0)
    methods = {"prefix": slimtune.PrefixTuning(length=6), "prompt": slimtune.PromptTuning(length=4),
               "lora": slimtune.LoRA(rank=4), "adapter": slimtune.Adapter(size=16),
               "bitfit": slimtune.BitFit(add_missing=True)}
    for user, method in methods.items():
        bank.add(user, method)
        with torch.no_grad():
            for p in bank.user_parameters(user):
                p.add_(torch.randn_like(p) * 0.02)
    try:
        users = ["prefix", "prompt", None, "lora", "adapter", "bitfit", "prefix"]
        texts = (REVIEWS * 3)[: len(users)]
        batch = tokenizer(texts, return_tensors="pt", padding=True)  # <bos> first, padded on the left
        with torch.no_grad():
            mixed = bank(**batch, users=users).logits
            for b, user in enumerate(users):
                alone = bank(**tokenizer([texts[b]], return_tensors="pt"), users=[user]).logits[0]
                torch.testing.assert_close(mixed[b][batch["attention_mask"][b].bool()], alone, atol=2e-4, rtol=1e-4)
        out = bank.generate(**batch, users=users, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for b, user in enumerate(users):
            alone = bank.generate(**tokenizer([texts[b]], return_tensors="pt"), users=[user], max_new_tokens=6,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert out[b, -6:].tolist() == alone[0, -6:].tolist(), user
    finally:
        bank.detach()
