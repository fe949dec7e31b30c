"""A tiny model folder with a word-level tokenizer and a toy data file, for tests of the trainer and CLI."""

import csv
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

WORDS = ["<pad>", "<eos>", "<unk>", "Text", "Label", "Input", "Output", ":", "yes", "no", "good", "bad",
         "film", "food", "the", "a", "very", "not", "plot", "actor", "cheese", "soup", "alice", "bob"]


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def model_folder(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(WORDS), n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        initializer_range=0.2)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def sentiment_file(path: Path, rows: int = 120, users: tuple[str, ...] = (), seed: int = 0) -> Path:
    """Label 'yes' when the text says good (or, for user bob, when it says bad)."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", *(["user"] if users else [])])
        for i in range(rows):
            good = rng.random() < 0.5
            words = [rng.choice(["the", "a", "very", "not"]), "good" if good else "bad", rng.choice(["film", "food", "plot"])]
            user = users[i % len(users)] if users else None
            label = "yes" if good != (user == "bob") else "no"
            writer.writerow([" ".join(words), label, *([user] if users else [])])
    return path
