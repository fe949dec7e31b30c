"""Make the AdapterHub fixtures: adapter folders saved by the real `adapters` package, and its outputs.

`adapters` 1.3 needs transformers 4.57, so this runs in an environment of its own, never beside slimtune:

    python3 -m venv adapters-env && adapters-env/bin/pip install torch==2.13.0 && adapters-env/bin/pip install adapters==1.3.0
    adapters-env/bin/python tests/make_adapterhub_fixtures.py          # rewrites tests/fixtures/adapterhub/

For each tiny random model (a BERT masked LM, a 3-label BERT classifier, GPT-2, Llama, and the encoder-decoders
BART, post-LN, and mBART, pre-LN) it adds adapters of the kinds slimtune reads, with every weight random, saves each
folder as AdapterHub does and records the model's outputs in eval mode (and one in training mode, dropout on) on a
padded batch in `reference.safetensors` (an encoder-decoder's decoder and encoder outputs); for the decoders' prefix
tunings also the logits of greedy generation from that batch (`generate()`, left-padded).

The base weights are not stored: `base_model` below fills every parameter from a generator seeded by its name,
so slimtune's tests rebuild exactly the same model under transformers 5 (importing this file does not import
`adapters`), and check the base model's outputs first.
"""

from __future__ import annotations

import copy
import json
import shutil
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent / "fixtures" / "adapterhub"
VOCAB = 96
LENGTHS = [10, 7, 4, 1]  # a batch of 4 x 10
TRAIN_SEED = 1234  # the dropout masks of the training-mode reference

SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
               pad_token_id=0, bos_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout=0.0,
               attention_dropout=0.0, activation_dropout=0.0)
MODELS = {
    "bert-mlm": ("BertConfig", "BertForMaskedLM", dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, pad_token_id=0, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)),
    "bert-cls": ("BertConfig", "BertForSequenceClassification", dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, pad_token_id=0, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(SEQ2SEQ)),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", dict(SEQ2SEQ)),
}
DECODERS = ("gpt2", "llama")
ENCODER_DECODERS = ("bart", "mbart")
GENERATED = 4  # new tokens in the generation references
NO_TOKEN = VOCAB  # their end-of-sequence id, past the vocabulary: no row ends


def fill(named, scale_2d: float = 1.0) -> None:
    """Every tensor of `named` ((name, parameter) pairs) from a generator seeded by its name: the same values in
    any environment, whatever order the parameters come in."""
    with torch.no_grad():
        for name, p in named:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise * scale_2d / p.shape[-1] ** 0.5)
            elif "norm" in name.lower() or name.split(".")[-2].startswith("ln"):
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def base_model(kind: str):
    """The tiny model `kind` of `MODELS` with its fixed weights, in eval mode, eager attention."""
    import transformers

    config_class, model_class, settings = MODELS[kind]
    config = getattr(transformers, config_class)(**settings)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_class)(config)
    fill(model.named_parameters())
    return model.eval()


def batch(kind: str) -> dict[str, torch.Tensor]:
    """4 rows of real lengths 10, 7, 4, 1: padded on the right for BERT, on the left (with the position ids that
    follow the mask) for the decoders; the encoder-decoders' decoder tokens are drawn next, of the same lengths and
    mask, padded on the right."""
    g = torch.Generator().manual_seed(7)
    width = max(LENGTHS)
    ids = torch.full((len(LENGTHS), width), 1 if kind in DECODERS else 0)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        cols = slice(width - n, width) if kind in DECODERS else slice(0, n)
        ids[b, cols] = torch.randint(2, VOCAB, (n,), generator=g)
        mask[b, cols] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if kind in DECODERS:
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if kind in ENCODER_DECODERS:
        out["decoder_input_ids"] = torch.randint(2, VOCAB, ids.shape, generator=g).masked_fill(mask == 0, 0)
        out["decoder_attention_mask"] = mask.clone()
    return out


def last_hidden(out) -> torch.Tensor:
    """The last hidden state: the decoder's on an encoder-decoder."""
    states = getattr(out, "decoder_hidden_states", None) or out.hidden_states
    return states[-1]


def outputs(model, inputs) -> dict[str, torch.Tensor]:
    """The last hidden state (the decoder's, and the encoder's as "encoder"), and a classifier's logits (a language
    model's follow from the hidden state)."""
    out = model(**inputs, output_hidden_states=True)
    kept = {"hidden": last_hidden(out)}
    if getattr(out, "encoder_last_hidden_state", None) is not None:
        kept["encoder"] = out.encoder_last_hidden_state
    if out.logits.dim() == 2:
        kept["logits"] = out.logits
    return {k: v.detach().contiguous() for k, v in kept.items()}


def adapter_configs():
    """{folder: (model kind, config, save as safetensors)}: the kinds slimtune reads."""
    from adapters import BnConfig, DoubleSeqBnConfig, LoRAConfig, PrefixTuningConfig, SeqBnConfig

    return {
        "bert-mlm/houlsby": ("bert-mlm", DoubleSeqBnConfig(reduction_factor=8, non_linearity="relu"), True),
        "bert-mlm/houlsby-gelu": ("bert-mlm", DoubleSeqBnConfig(reduction_factor=8, non_linearity="gelu"), False),
        "bert-mlm/houlsby-string": ("bert-mlm", "houlsby", False),  # swish, reduction factor 16
        "bert-mlm/pfeiffer": ("bert-mlm", SeqBnConfig(), True),  # relu, reduction factor 16
        "bert-mlm/pfeiffer-string": ("bert-mlm", "pfeiffer", False),
        "bert-mlm/ffn-houlsby": ("bert-mlm", BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=4,
                                                      non_linearity="tanh", scaling=0.5), True),
        "bert-mlm/pfeiffer-leave-out": ("bert-mlm", SeqBnConfig(reduction_factor=8, leave_out=[0]), True),
        "bert-mlm/lora": ("bert-mlm", LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], intermediate_lora=True,
                                                 output_lora=True), True),
        "bert-cls/pfeiffer": ("bert-cls", SeqBnConfig(reduction_factor=8), True),
        "bert-cls/houlsby": ("bert-cls", DoubleSeqBnConfig(reduction_factor=8, non_linearity="relu"), False),
        "gpt2/pfeiffer": ("gpt2", SeqBnConfig(reduction_factor=4), True),
        "gpt2/houlsby": ("gpt2", DoubleSeqBnConfig(reduction_factor=4, non_linearity="relu"), True),
        "llama/pfeiffer": ("llama", SeqBnConfig(reduction_factor=4), True),
        "llama/houlsby": ("llama", DoubleSeqBnConfig(reduction_factor=4, non_linearity="swish"), True),
        "llama/lora": ("llama", LoRAConfig(r=4, alpha=16), True),
        "bart/pfeiffer": ("bart", SeqBnConfig(reduction_factor=4), True),
        "bart/houlsby": ("bart", DoubleSeqBnConfig(reduction_factor=4, non_linearity="relu"), True),
        "mbart/pfeiffer": ("mbart", SeqBnConfig(reduction_factor=4, non_linearity="gelu"), True),
        "mbart/houlsby": ("mbart", DoubleSeqBnConfig(reduction_factor=4, non_linearity="relu"), True),
        "bert-mlm/prefix": ("bert-mlm", PrefixTuningConfig(prefix_length=5, bottleneck_size=16), False),
        # AdapterHub saves a prefix tuning's pool once per layer too, shared tensors that safetensors refuses: .bin
        "bert-cls/prefix": ("bert-cls", PrefixTuningConfig(prefix_length=4, bottleneck_size=8, non_linearity="relu"),
                            False),
        "gpt2/prefix": ("gpt2", PrefixTuningConfig(prefix_length=5, bottleneck_size=16), False),
        "llama/prefix": ("llama", PrefixTuningConfig(prefix_length=6, bottleneck_size=16), False),
        "llama/prefix-flat": ("llama", PrefixTuningConfig(prefix_length=3, flat=True), False),
    }


def generated(model, inputs) -> torch.Tensor:
    """The logits [GENERATED, rows, vocab] of greedy generation from `inputs` (positions from the mask), each step
    recomputed without a cache: AdapterHub 1.3's Llama layers under transformers 4.57 take the cache by its old
    keyword (`past_key_value`), so from its cache each new token would see only itself and the prefix. No token
    ends a row (`NO_TOKEN`): each step takes the argmax of the raw logits."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = NO_TOKEN
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], do_sample=False,
                         max_new_tokens=GENERATED, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=model.config.pad_token_id, use_cache=False, generation_config=config)
    return torch.stack(out.logits).contiguous()


def main() -> None:
    import adapters
    import transformers

    if HERE.exists():
        shutil.rmtree(HERE)
    HERE.mkdir(parents=True)
    references: dict[str, torch.Tensor] = {}
    for kind in MODELS:
        model = base_model(kind)
        inputs = batch(kind)
        references.update({f"{kind}.inputs.{k}": v for k, v in inputs.items()})
        with torch.no_grad():
            references.update({f"{kind}.base.{k}": v for k, v in outputs(model, inputs).items()})
    for folder, (kind, config, safetensors) in adapter_configs().items():
        model = base_model(kind)
        adapters.init(model)
        model.add_adapter("ah", config=config)
        model.set_active_adapters("ah")
        prefix = "/prefix" in folder
        # A prefix's values are keys and values themselves (flat) or made by an MLP: larger, to move the outputs.
        fill([(n, p) for n, p in model.named_parameters() if ".ah." in n or n.endswith(".ah")],
             scale_2d=4.0 if prefix else 0.5)
        if prefix and config.flat:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith(".control_trans"):
                        p.mul_(10)
        if kind == "bert-cls":  # a trained head: not the base model's
            fill([(n + ".trained", p) for n, p in model.classifier.named_parameters()])
        model.eval()
        inputs = batch(kind)
        with torch.no_grad():
            references.update({f"{folder}.{k}": v for k, v in outputs(model, inputs).items()})
            if prefix and kind in DECODERS:
                references[f"{folder}.generate.logits"] = generated(model, inputs)
        moved = (references[f"{folder}.hidden"] - references[f"{kind}.base.hidden"]).abs().max()
        assert moved > 1e-2, f"{folder}: the adapter changes nothing ({moved})"
        if folder == "bert-mlm/houlsby":  # dropout on (hidden_dropout_prob 0.1): the adapter reads drop(h)
            model.train()
            torch.manual_seed(TRAIN_SEED)
            with torch.no_grad():
                references[f"{folder}.train.hidden"] = outputs(model, inputs)["hidden"]
        (HERE / folder).mkdir(parents=True)
        model.save_adapter(str(HERE / folder), "ah", with_head=kind == "bert-cls", use_safetensors=safetensors)
    from safetensors.torch import save_file

    save_file(references, str(HERE / "reference.safetensors"))
    (HERE / "versions.json").write_text(json.dumps(
        {"adapters": adapters.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        indent=1) + "\n")
    total = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file())
    print(f"wrote {HERE} ({total} bytes)")


if __name__ == "__main__":
    main()
