"""The core once on the real packaged models: SmolLM2-135M (Llama decoder, GQA, tied embeddings), Gemma 3
270M (opt-in asset, `bash scripts/install-assets.sh --gemma`: q/k norms, embeddings scaled by sqrt(640), one
key/value head of 256, sliding-window layers of 512 beside full ones, a 262,144-token vocabulary) and
all-MiniLM-L6-v2 (BERT encoder, with a new classification head)."""

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


# The real decoders, with what each one's text starts with: Gemma is trained with <bos> first, so its
# tokenizer adds it and a text-initialised tuning stands in for [<bos>, text, x].
DECODERS = {"smollm2-135m": "", "gemma3-270m": "<bos>"}


@pytest.fixture(scope="module", params=list(DECODERS))
def decoder(request):
    model, tokenizer = _load(request.param)
    return request.param, model, tokenizer


@pytest.fixture(scope="module")
def minilm():
    return _load("minilm-l6", task_kind="classification", num_labels=2)


TEXT = "The following review is about a film."
REVIEWS = ["A gripping, beautifully shot thriller.", "Dull.", "I laughed, I cried, I left early."]


def encode(name, tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=bool(DECODERS[name]))


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_text_init_on_a_real_decoder_equals_the_model_on_text_plus_input(decoder, kind):
    name, model, tokenizer = decoder
    text_str = DECODERS[name] + TEXT
    text = tokenizer(text_str, add_special_tokens=False)["input_ids"]
    k = len(text)
    method = (slimtune.PromptTuning(length=k, init="text", text=text_str) if kind == "prompt"
              else slimtune.PrefixTuning(length=k, init="text", text=text_str, reparam=None))
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


def test_a_mixed_batch_on_a_real_decoder_equals_each_row_alone(decoder):
    name, model, tokenizer = decoder
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
        batch = encode(name, tokenizer, texts)  # padded on the left
        with torch.no_grad():
            mixed = bank(**batch, users=users).logits
            for b, user in enumerate(users):
                alone = bank(**encode(name, tokenizer, [texts[b]]), users=[user]).logits[0]
                torch.testing.assert_close(mixed[b][batch["attention_mask"][b].bool()], alone, atol=2e-4, rtol=1e-4)
        out = bank.generate(**batch, users=users, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for b, user in enumerate(users):
            alone = bank.generate(**encode(name, tokenizer, [texts[b]]), users=[user], max_new_tokens=6,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert out[b, -6:].tolist() == alone[0, -6:].tolist(), user
    finally:
        bank.detach()


def test_minilm_with_a_head_mixes_users_and_saves(minilm, tmp_path):
    model, tokenizer = minilm
    bank = slimtune.Bank(model, tokenizer)
    torch.manual_seed(0)
    for user, method in {"lora": slimtune.LoRA(rank=4), "prefix": slimtune.PrefixTuning(length=4),
                         "bitfit": slimtune.BitFit(), "prompt": slimtune.PromptTuning(length=3)}.items():
        bank.add(user, method)
        with torch.no_grad():
            for p in bank.user_parameters(user):
                p.add_(torch.randn_like(p) * 0.05)
    try:
        users = ["lora", "prefix", "bitfit", "prompt", None, "lora"]
        texts = (REVIEWS * 2)[: len(users)]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            mixed = bank(**batch, users=users).logits
            for b, user in enumerate(users):
                alone = bank(**tokenizer([texts[b]], return_tensors="pt"), users=[user]).logits[0]
                torch.testing.assert_close(mixed[b], alone, atol=1e-5, rtol=1e-4)
        bank.save("prefix", tmp_path / "prefix")
        report = slimtune.parameter_report(slimtune.load(model, tmp_path / "prefix"))
        assert report.trainable == 4 * 2 * 6 * 384 + 2 * 384 + 2  # k * (key, value) * layers * d + the head
    finally:
        bank.detach()
