"""Finding the places in a transformers model where a method attaches, by module name.

Names are the one thing every architecture has in common, so methods attach through forward
hooks on named modules instead of per-architecture model classes. Each default below is a list
of naming conventions tried in order; the first that matches the model wins, and a user can
always pass their own patterns.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .errors import TuningError

# LoRA defaults, as in the LoRA paper and HF PEFT: the query and value projections.
DEFAULT_LORA_TARGETS: list[list[str]] = [
    ["c_attn"],  # GPT-2: fused query/key/value
    ["q_proj", "v_proj"],  # Llama, Mistral, Qwen, Gemma, OPT, BART
    ["query", "value"],  # BERT, RoBERTa, MiniLM
    ["q", "v"],  # T5
]

# Adapter sites: (output of the attention block, output of the feed-forward block).
DEFAULT_ADAPTER_SITES: list[tuple[str, str]] = [
    (r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),  # GPT-2
    (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),  # Llama family
    (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),  # BERT family
    (r".*\.SelfAttention\.o", r".*\.DenseReluDense\.wo"),  # T5
    (r".*\.self_attn\.out_proj", r".*\.fc2"),  # BART, OPT
]

# Task heads that `AutoModelFor...` creates new (randomly initialised) on top of a pretrained body.
HEAD_NAMES = ("classifier", "score", "qa_outputs")
HEAD_CLASS_SUFFIXES = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), which is a linear layer with a transposed weight."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def matches(name: str, patterns: str | Sequence[str]) -> bool:
    """PEFT's convention: a string is a regular expression for the whole name; a list holds
    module names or name suffixes (`"q_proj"` matches `model.layers.0.self_attn.q_proj`)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def head_names(model: nn.Module) -> list[str]:
    """Names of the task head modules that a model class adds on top of the pretrained body."""
    if not type(model).__name__.endswith(HEAD_CLASS_SUFFIXES):
        return []
    return [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]


def in_head(name: str, heads: Iterable[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def body_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules outside any task head."""
    heads = head_names(model)
    return [(n, m) for n, m in model.named_modules() if n and not in_head(n, heads)]


def find_linears(model: nn.Module, patterns: str | Sequence[str]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in body_modules(model) if is_linear(m) and matches(n, patterns)]


def first_matching(model: nn.Module, candidates: Sequence, finder) -> tuple:
    for candidate in candidates:
        if finder(model, candidate):
            return candidate
    return ()


def describe_linears(model: nn.Module, limit: int = 8) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in body_modules(model) if is_linear(m)})
    return ", ".join(suffixes[:limit]) + (", ..." if len(suffixes) > limit else "")


def require(found: list, what: str, model: nn.Module, patterns) -> list:
    if not found:
        raise TuningError(
            f"{what} {patterns!r} matches no linear layer of {type(model).__name__}; "
            f"its linear layers end in: {describe_linears(model)}"
        )
    return found


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def fingerprint(model: nn.Module) -> dict:
    """What a tuning's shapes depend on; stored with every tuning and checked on load."""
    config = text_config(model)
    fields = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "num_labels"]
    out = {"architecture": type(model).__name__}
    for field in fields:
        value = getattr(config, field, None)
        if field == "num_labels" and not head_names(model):
            value = None
        if value is not None:
            out[field] = value
    out["weights_sample"] = weights_sample(model)
    return out


def weights_sample(model: nn.Module, n: int = 16) -> list[float]:
    """A few of the input embedding's values at fixed places: tells two models of the same
    architecture and size apart (another base model, or another fine-tune of it), in any dtype."""
    flat = model.get_input_embeddings().weight.detach().reshape(-1)
    index = (torch.arange(n) * (flat.numel() - 1) // (n - 1)).to(flat.device)  # integer: exact for any size
    return [round(float(v), 6) for v in flat.index_select(0, index).float().cpu()]


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def is_causal_decoder(model: nn.Module) -> bool:
    """A decoder-only language model: generated text continues on the right, so inputs pad left."""
    return not is_encoder_decoder(model) and any(getattr(m, "is_causal", False) is True for m in model.modules())


def body(model: nn.Module) -> nn.Module:
    """The pretrained body under a task head (`model.model` of LlamaForCausalLM), or the model itself."""
    inner = getattr(model, "base_model", model)
    return inner if isinstance(inner, nn.Module) else model


def accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters
