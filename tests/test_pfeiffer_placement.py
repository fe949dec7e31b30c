"""Pfeiffer's adapter on every architecture slimtune names. Where it reads follows each layer's order of operations:
post-LN, `z = LN(h + r)`, `LN(h + r + A(z))`; pre-LN, the residual sum `s = h + r`, `s + A(s)`. Where the names cannot
tell the two apart (fc1, fc2 and final_layer_norm in BART, mBART and OPT), the config does. AdapterHub's own outputs
are checked in test_adapterhub.py (BERT, GPT-2, Llama, BART, mBART); here, the formula by hand (OPT among others)."""

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GemmaConfig,
    GemmaForCausalLM,
    MarianConfig,
    MarianMTModel,
    MBartConfig,
    MBartForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

import slimtune
from slimtune.methods.adapter import adapter_sites

from conftest import BUILDERS, VOCAB
from helpers import perturb

DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
               pad_token_id=0, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.2)
OPT = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, dropout=0.0, attention_dropout=0.0)

TINY = {
    **BUILDERS,
    "roberta": lambda: RobertaForMaskedLM(RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DECODER)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**DECODER, head_dim=8)),
    "bart": lambda: BartForConditionalGeneration(BartConfig(**SEQ2SEQ)),
    "mbart": lambda: MBartForConditionalGeneration(MBartConfig(**SEQ2SEQ)),
    "opt": lambda: OPTForCausalLM(OPTConfig(**OPT, do_layer_norm_before=True)),
    "opt-350m": lambda: OPTForCausalLM(OPTConfig(**OPT, do_layer_norm_before=False)),
}
# What Pfeiffer's adapter reads after the first layer's feed-forward block, and whether that is a post-LN LayerNorm.
READS = {
    "gpt2": ("transformer.h.0", False),
    "llama": ("model.layers.0", False),
    "gemma3": ("model.layers.0", False),
    "bert": ("bert.encoder.layer.0.output.LayerNorm", True),
    "t5": ("encoder.block.0.layer.1", False),
    "roberta": ("roberta.encoder.layer.0.output.LayerNorm", True),
    "mistral": ("model.layers.0", False),
    "qwen2": ("model.layers.0", False),
    "gemma": ("model.layers.0", False),
    "bart": ("model.encoder.layers.0.final_layer_norm", True),
    "mbart": ("model.encoder.layers.0", False),
    "opt": ("model.decoder.layers.0", False),
    "opt-350m": ("model.decoder.layers.0.final_layer_norm", True),
}


def tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = TINY[arch]().eval()
    with torch.no_grad():  # LayerNorms away from (1, 0): a wrong LayerNorm would show
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(arch: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Two rows of 6 tokens, the second right-padded to 4 on the encoders, and decoder tokens on encoder-decoders.
    RoBERTa's position ids are given as it computes them (see test_roberta_keeps_its_own_positions)."""
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 6, dtype=torch.long)
    if not slimtune.modules.is_causal_decoder(model):
        mask[1, 4:] = 0
    ids = torch.randint(2, VOCAB, (2, 6), generator=g).masked_fill(mask == 0, model.config.pad_token_id)
    out = {"input_ids": ids, "attention_mask": mask}
    if slimtune.modules.is_encoder_decoder(model):
        out["decoder_input_ids"] = torch.randint(2, VOCAB, (2, 4), generator=g)
    if arch == "roberta":
        out["position_ids"] = type(model.roberta.embeddings).create_position_ids_from_input_ids(ids, 1)
    return out


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", list(TINY))
def test_pfeiffer_reads_where_each_feed_forward_block_joins_the_residual_stream(arch):
    model = tiny(arch)
    sites = adapter_sites(model, slimtune.Adapter(size=4, placement="pfeiffer"))
    ffn_layers = slimtune.Adapter(size=4, placement="pfeiffer").resolve(model).ffn_output
    first = next(iter(sites.items()))
    assert (first[0], first[1].renorm) == READS[arch]
    assert len(sites) == len(ffn_layers) and all(s.renorm == READS[arch][1] for s in sites.values())


@pytest.mark.parametrize("arch", list(TINY))
def test_the_site_follows_the_layers_own_order_of_operations(arch):
    """Where slimtune reads, traced in a forward pass after the first feed-forward output layer: a post-LN site is the
    next module to run (dropout aside), on a new tensor (the residual sum); a pre-LN site ends with no LayerNorm run on
    such a sum in between (Gemma's post-FFN norm takes the block's own output)."""
    model = tiny(arch)
    ffn = slimtune.Adapter(size=4, placement="pfeiffer").resolve(model).ffn_output[0]
    read, site = next(iter(adapter_sites(model, slimtune.Adapter(size=4, placement="pfeiffer")).items()))
    renorm = site.renorm
    found = dict(model.named_modules())
    events: list[tuple[str, str, object]] = []  # (start, module, its input) and (end, module, its output)
    handles = []
    for name, module in found.items():
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name: events.append(("start", name, args[0] if args else None))))
        handles.append(module.register_forward_hook(lambda m, args, out, name=name: events.append(("end", name, out))))
    logits(model, inputs(arch, model))
    for h in handles:
        h.remove()
    after = events[next(i for i, (e, n, _) in enumerate(events) if (e, n) == ("end", ffn)) + 1:]
    outputs = [out for event, _, out in after if event == "end"]

    def is_a_sum(event, name, x):
        """A LayerNorm run on a tensor no module returned: a residual sum."""
        return event == "start" and "norm" in type(found[name]).__name__.lower() and not any(x is o for o in outputs)

    if renorm:
        started = [(e, n, x) for e, n, x in after if e == "start" and not isinstance(found[n], nn.Dropout)]
        assert started[0][1] == read and is_a_sum(*started[0])
    else:
        inside = after[:next(i for i, (e, n, _) in enumerate(after) if (e, n) == ("end", read))]
        assert not any(is_a_sum(*event) for event in inside)


@pytest.mark.parametrize("arch", list(TINY))
def test_a_zero_up_projection_leaves_the_model_unchanged(arch):
    model = tiny(arch)
    batch = inputs(arch, model)
    want = logits(model, batch)
    tuned = slimtune.attach(model, slimtune.Adapter(size=4, placement="pfeiffer"))
    perturb([p for n, p in tuned.named_parameters() if ".blocks." in n and ".down." in n], seed=2)  # only W_up is 0
    assert torch.equal(logits(tuned, batch), want)


def by_hand(state: dict[str, torch.Tensor], site: str, renorm: bool):
    """A forward hook computing Pfeiffer's adapter at `site` from the saved weights: `LN(x + A(LN(x)))` on a post-LN
    LayerNorm of x = h + r, `s + A(s)` on the residual sum s."""
    def adapter(z):
        down = nn.functional.linear(z, state[f"{site}.adapter.down.weight"], state[f"{site}.adapter.down.bias"])
        return nn.functional.linear(torch.relu(down), state[f"{site}.adapter.up.weight"], state[f"{site}.adapter.up.bias"])

    def hook(module, args, output):
        if not renorm:
            return output + adapter(output)
        return nn.functional.layer_norm(args[0] + adapter(output), module.normalized_shape, module.weight, module.bias,
                                        module.eps)

    return hook


@pytest.mark.parametrize("arch", list(TINY))
def test_random_weights_on_one_layer_compute_the_formula_by_hand(arch):
    """The adapter after the first feed-forward block only, random weights: slimtune's logits are those of the frozen
    model with the formula written out at that block, for the adapted row of a batch; the other row is the base's."""
    model = tiny(arch)
    batch = inputs(arch, model)
    base = logits(model, batch)
    ffn = slimtune.Adapter(size=4, placement="pfeiffer").resolve(model).ffn_output[0]
    tuned = slimtune.attach(model, slimtune.Adapter(size=4, placement="pfeiffer", ffn_output=[ffn]))
    perturb([p for n, p in tuned.named_parameters() if ".blocks." in n], seed=3, scale=0.5)  # not BERT's head
    read, renorm = READS[arch]
    state = {k: v for k, v in tuned.bank.state("default").items() if ".adapter." in k}
    assert sorted(state) == sorted(f"{read}.adapter.{part}" for part in ("down.weight", "down.bias", "up.weight",
                                                                         "up.bias"))
    handle = dict(model.named_modules())[read].register_forward_hook(by_hand(state, read, renorm))
    try:
        want = logits(model, batch)
    finally:
        handle.remove()
    with torch.no_grad():
        got = tuned.bank(**batch, users=["default", None]).logits
    assert (got[0] - want[0]).abs().max() < 1e-5
    assert (got[1] - base[1]).abs().max() < 1e-5
    assert (want[0] - base[0]).abs().max() > 1e-2  # the adapter does something


def test_an_fc2_model_of_a_type_not_listed_is_refused_not_guessed():
    """Marian's layers are named as BART's; which order they run in is not guessed from the names."""
    model = MarianMTModel(MarianConfig(**SEQ2SEQ, decoder_start_token_id=0))
    with pytest.raises(slimtune.TuningError, match="placement 'pfeiffer' does not know where.*houlsby-ffn"):
        slimtune.attach(model, slimtune.Adapter(size=4, placement="pfeiffer"))
    slimtune.attach(model, slimtune.Adapter(size=4, placement="houlsby-ffn"))


def test_roberta_keeps_its_own_positions():
    """RoBERTa counts positions from padding_idx + 1: the positions a bank gives its rows must too."""
    model = tiny("roberta")
    batch = {k: v for k, v in inputs("roberta", model).items() if k != "position_ids"}
    want = logits(model, batch)
    assert torch.equal(logits(slimtune.attach(model, slimtune.Adapter(size=4, placement="pfeiffer")), batch), want)
