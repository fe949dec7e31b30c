"""Tiny random models built from configs: fast, no downloads. Dropout is off so that training-mode
runs are deterministic and comparable. Decoders use larger initial weights than the default 0.02,
without which a 32-wide random model cannot put a clear preference on any token."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96


def tiny_gpt2():
    config = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        initializer_range=0.2)
    return GPT2LMHeadModel(config)


def tiny_llama():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, initializer_range=0.2)
    return LlamaForCausalLM(config)


def tiny_gemma3():
    """Gemma 3's own parts at toy size: q/k norms, embeddings scaled by sqrt(hidden), query_pre_attn_scalar
    (not head_dim) for the attention scale, and a sliding window of 4 on layers 0, 1 and 3 (layer 2 is full
    attention), shorter than most test sequences, so the window bites. The head is untied from the embedding
    (the real model ties them): tied at this size, the model greedily repeats one token whatever comes before,
    and generation tests would compare nothing."""
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16,
                              sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                             "sliding_attention"],
                              max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                              attention_dropout=0.0, initializer_range=0.2, tie_word_embeddings=False)
    return Gemma3ForCausalLM(config)


def tiny_bert():
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=3, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def tiny_t5():
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    return T5ForConditionalGeneration(config)


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma3": tiny_gemma3, "bert": tiny_bert, "t5": tiny_t5}
DECODERS = ["gpt2", "llama", "gemma3"]


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


@pytest.fixture(params=list(BUILDERS))
def arch(request):
    return request.param


def batch_for(arch: str, batch: int = 4, length: int = 7, seed: int = 1):
    """A batch of random token ids with right padding on some rows, and the inputs the arch needs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, 4), generator=g)
    return inputs
