"""A generated row's text, decoded as its tokens come: the same text as decoding them all at once, stop strings
cut where they first appear, and each step decodes only a few tokens (not the whole row again)."""

import random

import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from slimtune.serving.text import RowText

from helpers import vocab_tokenizer

CORPUS = ["Le café est très bon, naïve façade", "日本語のテキストです", "emoji 🙂🚀 and more 🙂",
          "plain english words here"] * 50


@pytest.fixture(scope="module")
def byte_level():
    """A byte-level BPE (as GPT-2's and SmolLM2's) whose tokens split multi-byte characters."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")


def sequences(tokenizer, count, seed=0):
    rng = random.Random(seed)
    for i in range(count):
        if i % 2:
            yield [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]  # any ids, even broken UTF-8
        else:
            yield tokenizer(" ".join(rng.choice(CORPUS) for _ in range(3)))["input_ids"][:60]


def run(tokenizer, ids, stops=()):
    """(what was streamed, the final text, whether a stop string ended it)."""
    row, streamed, stopped = RowText(tokenizer, stops), "", False
    for token in ids:
        if row.add(token):
            stopped = True
            break
        assert row.text[:row.ready()].startswith(streamed)  # streamed text is never taken back
        streamed = row.text[:row.ready()]
    return streamed, row.final(), stopped


@pytest.mark.parametrize("which", ["byte_level", "word_level"])
def test_text_decoded_as_it_comes_is_the_text_decoded_at_once(which, byte_level):
    tokenizer = byte_level if which == "byte_level" else vocab_tokenizer()
    for ids in sequences(tokenizer, 400):
        streamed, final, _ = run(tokenizer, ids)
        assert final == tokenizer.decode(ids, skip_special_tokens=True)
        assert final.startswith(streamed) and "\ufffd" not in streamed[-1:]  # no half character is streamed


def test_the_text_ends_before_the_first_stop_string_and_nothing_of_it_is_streamed(byte_level):
    rng = random.Random(1)
    for ids in sequences(byte_level, 300, seed=2):
        full = byte_level.decode(ids, skip_special_tokens=True)
        if len(full) < 4:
            continue
        start = rng.randrange(len(full) - 2)
        stop = full[start:start + rng.randrange(1, 4)]
        streamed, final, stopped = run(byte_level, ids, [stop, "never there \x00"])
        assert final == full[:full.find(stop)], (stop, full)
        assert stopped or "\ufffd" in full[full.find(stop):]  # or found only once the last half character was let go
        assert final.startswith(streamed)


def test_each_new_token_is_decoded_with_a_few_before_it_not_the_whole_row(byte_level):
    windows = []
    decode = byte_level.decode

    def counted(ids, **options):
        windows.append(len(ids))
        return decode(ids, **options)

    byte_level.decode = counted
    try:
        ids = byte_level(" ".join(CORPUS[:120]))["input_ids"]
        streamed, final, _ = run(byte_level, ids)
    finally:
        byte_level.decode = decode
    assert len(ids) > 300 and final == decode(ids)
    assert max(windows) <= 8  # decoding the whole row at each step, as before, reached len(ids)
