"""Choosing real tokens to initialise prompts and prefixes from.

Lester et al. sample prompt tokens among the 5,000 most common tokens of the vocabulary. No
corpus counts ship with a model, so frequency is estimated from the token ids: BPE vocabularies
(GPT-2, Llama) number tokens in the order their merges were learnt, and merges are learnt most
frequent first; WordPiece and SentencePiece vocabularies are built frequency-ordered too. The
lowest ids, less special and reserved tokens, are therefore the most frequent ones.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..modules import text_config

_RESERVED = re.compile(r"^(\[.*\]|<.*>|<\|.*\|>)$")  # [unused0], [CLS], <s>, <|im_end|>


def frequent_token_ids(model: nn.Module, tokenizer=None, top: int = 5000) -> list[int]:
    vocab = model.get_input_embeddings().weight.shape[0]
    config = text_config(model)
    special = {getattr(config, f, None) for f in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")}
    if tokenizer is not None:
        special.update(tokenizer.all_special_ids)
    ids = []
    for i in range(vocab):
        if i in special:
            continue
        if tokenizer is not None:
            token = tokenizer.convert_ids_to_tokens(i)
            if token is None or _RESERVED.match(token) or not token.strip():
                continue
        ids.append(i)
        if len(ids) == top:
            break
    return ids


def sample_frequent(model: nn.Module, count: int, tokenizer=None, top: int = 5000) -> list[int]:
    """`count` token ids drawn from the `top` most frequent (without replacement when possible)."""
    pool = torch.tensor(frequent_token_ids(model, tokenizer, top))
    if count <= len(pool):
        pick = torch.randperm(len(pool))[:count]
    else:
        pick = torch.randint(len(pool), (count,))
    return pool[pick].tolist()


def cycle(ids: list[int], length: int) -> list[int]:
    """`ids` repeated or cut to exactly `length` tokens."""
    return [ids[i % len(ids)] for i in range(length)]
