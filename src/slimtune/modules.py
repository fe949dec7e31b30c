"""Finding the places in a transformers model where a method attaches, by module name.

Names are the one thing every architecture has in common, so methods attach through forward
hooks on named modules instead of per-architecture model classes. Each default below is a list
of naming conventions tried in order; the first that matches the model wins, and a user can
always pass their own patterns.

A pattern is PEFT's `target_modules`: a string is a regular expression for the whole module name,
a list holds module names or name suffixes. Patterns come from users (and through the server from
anyone), so regular expressions run on RE2, whose matching time is linear in the name. Python's
`re` backtracks: a nested repetition such as `([\\w.]+)+!` doubles its time with each character
of a module name, an hour on one of BERT's.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import re2
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

# The dropout each architecture applies to an adapter site's output (the residual dropout), by the site's name:
# Houlsby's adapter reads the dropped-out projection, as in his reference code. Where none is named (Llama has no
# residual dropout; BART's is a function call), the adapter reads the linear layer's output.
RESIDUAL_DROPOUTS: list[tuple[str, str]] = [
    (r"(.*\.attn)\.c_proj", r"\1.resid_dropout"),  # GPT-2
    (r"(.*\.mlp)\.c_proj", r"\1.dropout"),  # GPT-2
    (r"(.*\.output)\.dense", r"\1.dropout"),  # BERT family
    (r"(.*\.layer\.\d+)\.(?:SelfAttention\.o|EncDecAttention\.o|DenseReluDense\.wo)", r"\1.dropout"),  # T5
]

# Layers of fc1, fc2 and final_layer_norm come in both orders: pre-LN (the norm before fc1, the layer's output the
# residual sum) and post-LN (the norm after fc2's residual add). The names cannot tell them apart; the config can:
# OPT's `do_layer_norm_before` (false on opt-350m), BART's and mBART's model type. A model type not listed here is
# not guessed: Pfeiffer's adapter is refused there.
FC2_PRE_LN = {"bart": False, "mbart": True}


def fc2_pre_ln(config: Any) -> bool | None:
    """Whether a model's fc1/fc2/final_layer_norm layers are pre-LN (True) or post-LN (False); None where not known."""
    if config.model_type == "opt":
        return bool(config.do_layer_norm_before)
    return FC2_PRE_LN.get(config.model_type)


def any_config(config: Any) -> bool:
    return True


# Where a feed-forward block's output joins the residual stream, by the name of its output layer: on a post-LN
# layer the LayerNorm of (residual + output) ("norm"), on a pre-LN one the module whose output is that sum
# ("stream"), on models whose config the entry's last element accepts. Pfeiffer's adapter reads there.
FFN_RESIDUALS: list[tuple[str, str, str, Callable[[Any], bool]]] = [
    (r"(.*\.h\.\d+)\.mlp\.c_proj", "stream", r"\1", any_config),  # GPT-2: the block's output
    # Llama family (Mistral, Qwen; Gemma: after its post-FFN norm)
    (r"(.*\.layers\.\d+)\.mlp\.down_proj", "stream", r"\1", any_config),
    (r"(.*\.layer\.\d+\.output)\.dense", "norm", r"\1.LayerNorm", any_config),  # BERT family (RoBERTa)
    (r"(.*\.layer\.\d+)\.DenseReluDense\.wo", "stream", r"\1", any_config),  # T5: T5LayerFF's output
    (r"(.*\.layers\.\d+)\.fc2", "norm", r"\1.final_layer_norm", lambda c: fc2_pre_ln(c) is False),  # BART, opt-350m
    (r"(.*\.layers\.\d+)\.fc2", "stream", r"\1", lambda c: fc2_pre_ln(c) is True),  # mBART, OPT: the layer's output
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


# Far longer than any pattern written by hand. RE2 bounds a compiled pattern's memory itself; this
# keeps compiling cheap and error messages short.
MAX_PATTERN_CHARS = 1000
PATTERN_SYNTAX = "patterns use RE2 syntax (Python's re without backreferences or lookaround)"


# Each compiled pattern holds up to RE2's 8 MiB default: a small cache keeps the few patterns in use.
@functools.lru_cache(maxsize=64)
def _compile(pattern: str):
    options = re2.Options()
    options.log_errors = False  # the error is raised, not also printed to stderr
    return re2.compile(pattern, options)


def compile_pattern(pattern: str, what: str = "module pattern") -> Callable[[str], bool]:
    """Whether a name fully matches `pattern` (compiled by RE2 once), or a TuningError naming `what`
    and saying why the pattern is refused."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise TuningError(
            f"{what} {pattern[:40]!r}... is {len(pattern)} characters long; a pattern is at most {MAX_PATTERN_CHARS}"
        )
    try:
        compiled = _compile(pattern)
    except re2.error as err:
        reason = err.args[0].decode(errors="replace") if err.args and isinstance(err.args[0], bytes) else str(err)
        raise TuningError(f"{what} {pattern!r} is not a valid pattern: {reason} — {PATTERN_SYNTAX}") from None
    return lambda name: compiled.fullmatch(name) is not None


def check_patterns(patterns: object, what: str) -> str | tuple[str, ...] | None:
    """`patterns` as a method holds them: None, a valid pattern string, or a tuple of names (from any
    sequence, e.g. a JSON list); anything else is a TuningError naming `what`."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        compile_pattern(patterns, what)
        return patterns
    if isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns):
        return tuple(patterns)
    raise TuningError(
        f"{what} must be a regular expression (a string) or a list of module names or name suffixes, "
        f"got {_short(patterns)}"
    )


def matcher(patterns: str | Sequence[str], what: str = "module pattern") -> Callable[[str], bool]:
    """Whether a module name is selected by `patterns`, PEFT's convention: a string is a regular
    expression for the whole name; a list holds module names or name suffixes (`"q_proj"` matches
    `model.layers.0.self_attn.q_proj`). A list is looked up by the name's dotted suffixes, so a long
    list costs no more per name than a short one."""
    if isinstance(patterns, str):
        return compile_pattern(patterns, what)
    wanted = frozenset(patterns)
    return lambda name: name in wanted or any(name[i + 1:] in wanted for i, c in enumerate(name) if c == ".")


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


def find_linears(
    model: nn.Module, patterns: str | Sequence[str], what: str = "module pattern"
) -> list[tuple[str, nn.Module]]:
    """The linear layers outside any task head that `patterns` select, in the model's order."""
    found = body_modules(model)
    if not isinstance(patterns, str) and len(patterns) > len(found):
        raise TuningError(
            f"{what} lists {len(patterns)} module names, more than the {len(found)} modules of "
            f"{type(model).__name__}; list some of its modules, or give a regular expression"
        )
    selected = matcher(patterns, what)
    return [(n, m) for n, m in found if is_linear(m) and selected(n)]


def explicit_names(model: nn.Module, names: Sequence[str], what: str) -> tuple[str, ...]:
    """`names`, full names of linear layers that a method's patterns selected on `model`, as the patterns
    to store in their place. A listed name also matches as a suffix, so a model where another linear
    layer's name ends with one of them (`encoder.block.0.fc` beside `block.0.fc`) is refused: there, no
    list of names selects the same layers."""
    out, listed = tuple(names), set(names)
    extra = [n for n, _ in find_linears(model, out, what) if n not in listed]
    if extra:
        owner = next(n for n in out if extra[0].endswith("." + n))
        raise TuningError(
            f"{what} cannot be stored as module names on {type(model).__name__}: the name {owner!r} also "
            f"selects {extra[0]!r}; a list of names selects each name and every module whose name ends with it"
        )
    return out


def residual_dropout(model: nn.Module, name: str) -> str:
    """The name of the dropout module applied to the output of layer `name` before its residual add (see
    `RESIDUAL_DROPOUTS`), or `name` itself where there is none."""
    found = dict(model.named_modules())
    for pattern, target in RESIDUAL_DROPOUTS:
        dropout = re2.fullmatch(pattern, name) and re2.sub(pattern, target, name)
        if dropout and isinstance(found.get(dropout), nn.Dropout):
            return dropout
    return name


def position_start(model: nn.Module) -> int:
    """The position id of a sequence's first token: 0, or `padding_idx + 1` where the position embedding reserves the
    ids up to its padding index (RoBERTa and its family, which count positions from there)."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return module.padding_idx + 1
    return 0


def mask_positions(mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Each row's position ids as its mask gives them, from `start` at its first real token (as generate() does, so
    a padded row gets the positions it would get alone); padding at `start - 1`, the padding index, where there is
    one (as RoBERTa gives it)."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0) + start
    return positions.masked_fill(mask == 0, start - 1) if start > 0 else positions


def ffn_residual(model: nn.Module, name: str) -> tuple[str, bool] | None:
    """Where the output of feed-forward output layer `name` joins the residual stream (see `FFN_RESIDUALS`):
    (module name, True) for the LayerNorm of a post-LN layer, (module name, False) for the module whose output is
    the residual sum on a pre-LN one; None where this is not known."""
    found, config = dict(model.named_modules()), text_config(model)
    for pattern, kind, target, applies in FFN_RESIDUALS:
        if re2.fullmatch(pattern, name) and applies(config):
            module = re2.sub(pattern, target, name)
            if module in found and (kind == "stream" or "norm" in type(found[module]).__name__.lower()):
                return module, kind == "norm"
    return None


def first_matching(model: nn.Module, candidates: Sequence, finder) -> tuple:
    for candidate in candidates:
        if finder(model, candidate):
            return candidate
    return ()


def describe_linears(model: nn.Module, limit: int = 8) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in body_modules(model) if is_linear(m)})
    return ", ".join(suffixes[:limit]) + (", ..." if len(suffixes) > limit else "")


def _short(patterns: object) -> str:
    """A pattern or list for an error message: a list of hundreds of names is cut short."""
    if isinstance(patterns, (list, tuple)) and len(patterns) > 4:
        return f"{list(patterns[:3])!r} and {len(patterns) - 3} more"
    return repr(patterns)[:200]


def require(found: list, what: str, model: nn.Module, patterns) -> list:
    if not found:
        raise TuningError(
            f"{what} {_short(patterns)} matches no linear layer of {type(model).__name__}; "
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
