"""Shared test helpers: tunings with non-trivial parameters, and padded batches."""

import torch

import slimtune

from conftest import DECODERS, VOCAB


def perturb(parameters, seed: int = 0, scale: float = 0.1) -> None:
    """Give freshly initialised tunings random values, so a zero-initialised one is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * scale)


def bitfit_for(arch: str) -> slimtune.BitFit:
    return slimtune.BitFit(add_missing=arch in ("llama", "gemma3", "t5"))  # Llama, Gemma and T5 have no biases


def methods_for(arch: str) -> dict[str, slimtune.Method]:
    """One user per method, two prompt and two prefix lengths, and second users of the same shapes
    (their rows run through the stacked, gathered path)."""
    return {
        "lora": slimtune.LoRA(rank=4),
        "lora2": slimtune.LoRA(rank=4, alpha=8),
        "prefix3": slimtune.PrefixTuning(length=3, reparam=None, init="random"),
        "prefix5": slimtune.PrefixTuning(length=5),
        "prompt2": slimtune.PromptTuning(length=2),
        "prompt4": slimtune.PromptTuning(length=4, init="uniform"),
        "houlsby": slimtune.Adapter(size=8),
        "pfeiffer": slimtune.Adapter(size=4, placement="pfeiffer", activation="gelu"),
        "bitfit": bitfit_for(arch),
        "houlsby2": slimtune.Adapter(size=8),
        "bitfit2": bitfit_for(arch),
    }


def padded_batch(arch: str, lengths: list[int], seed: int = 1):
    """Rows of the given real lengths, padded on the left (decoders) or right (encoders)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 1)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    left = arch in DECODERS
    for b, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[b, cols] = torch.randint(2, VOCAB, (n,), generator=g)
        mask[b, cols] = 1
    return ids, mask


def real_tokens(ids, mask, b):
    return ids[b][mask[b].bool()][None]


def generated(sequence, prompt_length: int, eos: int = 1) -> list[int]:
    """The new tokens of one generated row, up to its first end-of-sequence token (a row that ends
    early in a batch is padded after it, the same row alone just stops)."""
    new = sequence[prompt_length:].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def vocab_tokenizer():
    """A word-level tokenizer for the tiny models' 96 ids: "<bos>", "<eos>", then "t2" .. "t95"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<bos>", "<eos>"] + [f"t{i}" for i in range(2, VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>",
                                   unk_token="t2")
