"""Reading AdapterHub (`adapters`) folders: adapter_config.json + adapter.safetensors or pytorch_adapter.bin,
and the head's head_config.json + model_head.safetensors or pytorch_model_head.bin when it was saved with one.

Only what slimtune computes as AdapterHub does is read; anything else is refused with its option named.

- Bottleneck adapters (`BnConfig` and its presets): `<module>.adapters.<name>.adapter_down.0` and `.adapter_up`
  are slimtune's `<site>.adapter.down` and `.up`, no transposes. `original_ln_before=False` (Houlsby's form:
  the adapter reads the sub-layer's dropped-out projection) after attention and feed-forward is
  `Adapter(placement="houlsby")`, after feed-forward only `"houlsby-ffn"`; `original_ln_before=True` with
  `residual_before_ln=True` (Pfeiffer's, `SeqBnConfig`) after feed-forward only is `"pfeiffer"`. A constant
  `scaling` is folded into the up projection; `leave_out` becomes the explicit list of the layers that have
  weights.
- LoRA (`LoRAConfig`, composition "add"): `<module>.loras.<name>.lora_A` [r, in] and `.lora_B` [out, r], scaled
  by alpha / r, are slimtune's `<module>.lora_A` / `.lora_B`.
- Prefix tuning (`PrefixTuningConfig`): one pool module per model, `prefix_tunings.<name>.self_prefix`, makes every
  layer's prefix at once: P = Linear_2(σ(Linear_1(E))) with E the embedding `wte` [k, hidden] (`control_trans.0`
  and `.2`; σ the `non_linearity`), or P saved as is (`flat=True`, `control_trans` [k · layers · 2 · kv_heads ·
  head_dim]); per prefix position: layer, then key/value, then head, then head size. P is computed here once, in
  evaluation (no dropout), and read as slimtune's `<attention>.prefix` [2, kv_heads, k, head_dim] of a
  `PrefixTuning(positions="from-zero")`: AdapterHub only concatenates P before each layer's keys and values (after
  RoPE, unrotated) and widens the mask with k visible columns, leaving the real tokens' positions as they are.
- A static head (an HF model class with its own head, `head_config.json` whose `config` is null): its weights
  (`classifier.weight`, ...) are the tuning's head.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import re2
import torch
from safetensors.torch import load as load_tensors
from torch import nn

from . import modules, storage
from .errors import ModelMismatchError, TuningError, TuningFileError
from .methods import Adapter, LoRA, Method, PrefixTuning
from .methods.adapter import adapter_layers
from .methods.prefix import PrefixComponent

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")
FILES = frozenset({CONFIG, *WEIGHTS, HEAD_CONFIG, *HEAD_WEIGHTS})
MAX_FILE_BYTES = 1 << 31
MAX_TENSORS = 20_000
MAX_NAME = 500

# AdapterHub's activation names (transformers' `get_activation`) that are slimtune's, exactly.
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "silu", "tanh": "tanh"}
# Bottleneck options slimtune has no equivalent for, with the value that changes nothing, and what they are.
BN_REFUSED = {
    "phm_layer": (False, "phm_layer (Compacter's parameterised hypercomplex layers)"),
    "is_parallel": (False, "is_parallel (parallel adapters, He et al.)"),
    "use_gating": (False, "use_gating (UniPELT's gates)"),
    "inv_adapter": (None, "inv_adapter (invertible adapters on the embeddings, MAD-X)"),
    "ln_before": (False, "ln_before (a new LayerNorm before the adapter)"),
    "ln_after": (False, "ln_after (a new LayerNorm after the adapter)"),
    "cross_adapter": (False, "cross_adapter (adapters after cross-attention)"),
    "original_ln_after": (True, "original_ln_after=false (no residual and LayerNorm after the adapter)"),
}
LORA_REFUSED = {
    "composition_mode": ("add", "composition_mode='scale' ((IA)^3 through LoRA layers)"),
    "use_gating": (False, "use_gating (gated LoRA)"),
    "use_dora": (False, "use_dora (AdapterHub's DoRA)"),
    "vera_d": (None, "vera_d (VeRA)"),
    "vera_b": (None, "vera_b (VeRA)"),
}
PREFIX_REFUSED = {
    "use_gating": (False, "use_gating (prefix gates computed from each layer's input, UniPELT)"),
}
# The prefix MLP's activations (transformers' `get_activation`, AdapterHub's "leakyrelu"), computed once at load.
PREFIX_ACTIVATIONS = {
    "tanh": torch.tanh, "relu": nn.functional.relu, "gelu": nn.functional.gelu, "swish": nn.functional.silu,
    "silu": nn.functional.silu, "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "leakyrelu": nn.functional.leaky_relu,
}
# Architectures other than adapters, LoRA and prefix tuning, by AdapterHub's `architecture` field.
OTHER_ARCHITECTURES = {
    "prompt_tuning": "prompt tuning",
    "union": "a ConfigUnion (several methods at once, e.g. MAM or UniPELT)",
    "reft": "ReFT",
}


def is_adapterhub_config(config: dict) -> bool:
    """Whether an adapter_config.json (already parsed) was written by AdapterHub rather than PEFT."""
    return "peft_type" not in config and "config" in config and ("model_class" in config or "version" in config)


def read(folder: str | os.PathLike, config: dict, model: nn.Module) -> tuple[Method, dict[str, torch.Tensor]]:
    """An AdapterHub folder's tuning as slimtune's method config and saved-form tensors, checked to fit `model`."""
    folder = Path(folder)
    where = f"AdapterHub folder '{folder}'"
    if (folder / "adapter_fusion_config.json").is_file():
        raise TuningError(f"{where} holds an AdapterFusion, which slimtune has no equivalent for")
    inner = config.get("config")
    if not isinstance(inner, dict):
        raise TuningFileError(f"{where}: 'config' in {CONFIG} must be an object (the adapter's full configuration)")
    name = config.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "." in name:
        raise TuningFileError(f"{where}: 'name' in {CONFIG} must be the adapter's name, got {str(name)[:40]!r}")
    _check_model(config, model, where)
    architecture = inner.get("architecture")
    if architecture in OTHER_ARCHITECTURES or architecture not in (None, "bottleneck", "lora", "prefix_tuning"):
        what = OTHER_ARCHITECTURES.get(architecture, f"architecture {str(architecture)[:40]!r}")
        raise TuningError(f"{where} holds {what}; slimtune reads AdapterHub's bottleneck adapters, LoRA and prefix "
                          "tuning")
    tensors = _read_weights(folder, WEIGHTS, where)
    if architecture == "lora":
        method, state = _read_lora(inner, name, tensors, model, where)
    elif architecture == "prefix_tuning":
        method, state = _read_prefix(inner, config, name, tensors, model, where)
    else:
        method, state = _read_bottleneck(inner, config, name, tensors, model, where)
    state.update({f"head.{k}": v for k, v in _read_head(folder, model, where).items()})
    return method, state


def _check_model(config: dict, model: nn.Module, where: str) -> None:
    text = modules.text_config(model)
    saved_type, hidden = config.get("model_type"), config.get("hidden_size")
    if saved_type is not None and saved_type != getattr(text, "model_type", saved_type):
        raise ModelMismatchError(f"{where} was made for a {str(saved_type)[:40]!r} model, this one is "
                                 f"{text.model_type!r}")
    if hidden is not None and hidden != getattr(text, "hidden_size", hidden):
        raise ModelMismatchError(f"{where} was made for hidden size {str(hidden)[:20]}, this model has "
                                 f"{text.hidden_size}")


def _read_weights(folder: Path, names: tuple[str, str], where: str, required: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of the first of `names` in `folder` (safetensors, else a .bin read with weights_only), checked
    to be a bounded number of finite floating-point tensors with short names."""
    path = next((folder / n for n in names if (folder / n).is_file()), None)
    if path is None:
        if not required:
            return {}
        raise TuningFileError(f"{where} has {CONFIG} but neither {names[0]} nor {names[1]}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise TuningFileError(f"{where}: {path.name} is over {MAX_FILE_BYTES} bytes")
    try:
        if path.suffix == ".safetensors":
            tensors = load_tensors(path.read_bytes())
        else:  # weights_only: tensors in plain containers, no code runs on load
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors' and the unpickler's own error types
        raise TuningFileError(f"{where}: {path.name} cannot be read: {str(err)[:200]}") from None
    if not isinstance(tensors, dict) or len(tensors) > MAX_TENSORS:
        raise TuningFileError(f"{where}: {path.name} must hold at most {MAX_TENSORS} named tensors")
    for key, tensor in tensors.items():
        if not isinstance(key, str) or len(key) > MAX_NAME or not isinstance(tensor, torch.Tensor):
            raise TuningFileError(f"{where}: {path.name} holds an entry that is not a named tensor: {str(key)[:60]!r}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise TuningFileError(f"{where}: tensor {key!r} must be finite floating point")
    return tensors


def _refuse(inner: dict, refused: dict, where: str) -> None:
    for option, (neutral, what) in refused.items():
        if inner.get(option, neutral) != neutral:
            raise TuningError(f"{where} uses {what} (`{option}`: {str(inner[option])[:40]}), which slimtune has no "
                              "equivalent for")


# --- bottleneck adapters -------------------------------------------------------------------------------------

BN_KEY = r"(.+)\.adapters\.{name}\.(adapter_down\.0|adapter_up)\.(weight|bias)"


def _placement(inner: dict, where: str) -> str:
    attention, ffn = inner.get("mh_adapter"), inner.get("output_adapter")
    if not isinstance(attention, bool) or not isinstance(ffn, bool) or not ffn:
        raise TuningError(f"{where}: slimtune's adapters follow the feed-forward block (output_adapter=true), with or "
                          f"without one after attention (mh_adapter); got mh_adapter={attention}, output_adapter={ffn}")
    if not inner.get("original_ln_before", False):
        return "houlsby" if attention else "houlsby-ffn"
    if inner.get("residual_before_ln", True) is not True:
        raise TuningError(f"{where} uses residual_before_ln={inner['residual_before_ln']!r} with original_ln_before: "
                          "slimtune's Pfeiffer adapter adds its output back before the LayerNorm (residual_before_ln=true)")
    if attention:
        raise TuningError(f"{where} puts Pfeiffer's adapter (original_ln_before=true) after attention too "
                          "(mh_adapter=true); slimtune's Pfeiffer adapter follows the feed-forward block only")
    return "pfeiffer"


def _activation_name(inner: dict, config: dict):
    name = inner.get("non_linearity")
    name = name.lower() if isinstance(name, str) else name
    if "version" not in config:  # adapter-transformers 2 named the tanh approximation "gelu", as AdapterHub reads it
        name = {"gelu": "gelu_new", "gelu_orig": "gelu"}.get(name, name)
    return name


def _activation(inner: dict, config: dict, where: str) -> str:
    name = _activation_name(inner, config)
    if name not in ACTIVATIONS:
        raise TuningError(f"{where} uses non_linearity {str(name)[:40]!r}; slimtune's adapters have "
                          f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _scaling(inner: dict, where: str) -> float:
    scaling = inner.get("scaling", 1.0)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise TuningError(f"{where} uses scaling={str(scaling)[:40]!r} (a learned scale); slimtune reads a constant "
                          "scaling, folded into the up projection")
    return float(scaling)


def _read_bottleneck(inner: dict, config: dict, name: str, tensors: dict, model: nn.Module, where: str
                     ) -> tuple[Adapter, dict[str, torch.Tensor]]:
    _refuse(inner, BN_REFUSED, where)
    placement = _placement(inner, where)
    activation = _activation(inner, config, where)
    scaling = _scaling(inner, where)
    if inner.get("dropout") or inner.get("stochastic_depth"):
        warnings.warn(f"{where} trains with dropout/stochastic_depth inside the adapter; slimtune's adapter has "
                      "none (they do nothing in evaluation)", stacklevel=4)
    key = re2.compile(BN_KEY.format(name=re2.escape(name)))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, tensor in tensors.items():
        found = key.fullmatch(k)
        if found is None:
            raise TuningError(f"{where}: tensor {k!r} is not part of a bottleneck adapter named {name!r} "
                              "(adapter_down.0 and adapter_up)")
        part = {"adapter_down.0": "down", "adapter_up": "up"}[found.group(2)]
        parts.setdefault(found.group(1), {})[f"{part}.{found.group(3)}"] = tensor
    default = Adapter(size=1, placement=placement)
    layers = adapter_layers(model, default)
    chosen: dict[str, list[str]] = {field: [] for field in layers}
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for path, block in parts.items():
        field = "attention_output" if _is_attention(path) else "ffn_output"
        if field not in layers:
            raise TuningError(f"{where} has an adapter after attention at {path!r}, but its config says none "
                              "(mh_adapter=false)")
        linear = _site_for(path, [n for n, _ in layers[field]], where)
        chosen[field].append(linear)
        blocks[linear] = block
    if not chosen["ffn_output"]:
        raise TuningError(f"{where} holds no adapter weights named {name!r}")
    _check_leave_out(inner, layers, chosen, where)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    fields = {field: tuple(sorted(names, key=order.__getitem__)) for field, names in chosen.items()}
    sizes = {tuple(b.get("down.weight", torch.empty(0)).shape)[:1] for b in blocks.values()}
    if len(sizes) != 1 or not next(iter(sizes)):
        raise TuningError(f"{where}: its adapters have bottleneck widths {sorted(sizes)}; slimtune's adapters have "
                          "one width (a reduction_factor per layer is not supported)")
    method = Adapter(size=next(iter(sizes))[0], placement=placement, activation=activation,
                     attention_output=fields.get("attention_output") or None, ffn_output=fields["ffn_output"])
    state = {}
    for linear, block in blocks.items():
        site = modules.ffn_residual(model, linear)[0] if placement == "pfeiffer" else linear
        for part in ("down.weight", "down.bias", "up.weight", "up.bias"):
            if part not in block:
                raise TuningError(f"{where}: the adapter at {linear!r} has no {part}")
            tensor = block[part] * scaling if part.startswith("up.") and scaling != 1.0 else block[part]
            state[f"{site}.adapter.{part}"] = tensor
    return method, state


def _is_attention(path: str) -> bool:
    """Whether AdapterHub's adapter module at `path` follows an attention block: `attention_adapters` (GPT-2,
    Llama, ...) or the attention block's output module (BERT's `attention.output`)."""
    last = path.rsplit(".", 2)[-2:]
    return last[-1] == "attention_adapters" or last == ["attention", "output"] or "cross" in last[-1]


def _site_for(path: str, candidates: list[str], where: str) -> str:
    """slimtune's site among `candidates` (full names of the blocks' output layers) for AdapterHub's adapter module
    at `path`: the one inside the same layer (`path` without its `*_adapters` part), saved from the model itself or
    from its body."""
    if "cross" in path.rsplit(".", 1)[-1]:
        raise TuningError(f"{where} has an adapter after cross-attention at {path!r}; slimtune has none there")
    layer = path.rsplit(".", 1)[0] if path.endswith("_adapters") else path
    found = [c for c in candidates if c.startswith(layer + ".")] or [c for c in candidates if f".{layer}." in c]
    if len(found) != 1:
        raise ModelMismatchError(f"{where} has an adapter at {path!r}, which is no single layer of this model "
                                 f"(it matches {len(found)}); was it made for another architecture?")
    return found[0]


def _check_leave_out(inner: dict, layers: dict, chosen: dict, where: str) -> None:
    """The layers with weights must be the model's layers but `leave_out`, counted from 0 as AdapterHub does (on a
    model with one stack of layers, where its count is the model's)."""
    leave_out = inner.get("leave_out") or []
    if not isinstance(leave_out, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in leave_out):
        raise TuningFileError(f"{where}: leave_out must be a list of layer numbers, got {str(leave_out)[:60]!r}")
    for field, found in layers.items():
        names = [n for n, _ in found]
        if set(leave_out) - set(range(len(names))):
            raise TuningError(f"{where} leaves out layers {sorted(leave_out)}, which this model's {len(names)} layers "
                              "cannot express")
        expected = {n for i, n in enumerate(names) if i not in leave_out}
        if set(chosen[field]) != expected:
            raise ModelMismatchError(f"{where}: its adapters ({field}) are at {len(chosen[field])} layers, its config "
                                     f"(leave_out {sorted(leave_out)}) says {len(expected)} of this model's {len(names)}")


# --- LoRA ----------------------------------------------------------------------------------------------------

LORA_KEY = r"(.+)\.loras\.{name}\.(lora_A|lora_B)"


def _read_lora(inner: dict, name: str, tensors: dict, model: nn.Module, where: str) -> tuple[LoRA, dict]:
    _refuse(inner, LORA_REFUSED, where)
    rank, alpha, dropout = inner.get("r"), inner.get("alpha"), inner.get("dropout", 0.0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise TuningFileError(f"{where}: LoRA r must be a positive integer, got {str(rank)[:20]!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TuningFileError(f"{where}: LoRA alpha must be a number, got {str(alpha)[:20]!r}")
    key = re2.compile(LORA_KEY.format(name=re2.escape(name)))
    found_modules = dict(modules.body_modules(model))
    state, targets = {}, []
    for k, tensor in tensors.items():
        found = key.fullmatch(k)
        if found is None:
            raise TuningError(f"{where}: tensor {k!r} is not part of a LoRA named {name!r} (lora_A and lora_B)")
        module = _module_for(found.group(1), found_modules, where)
        if not modules.is_linear(found_modules[module]) or type(found_modules[module]).__name__ == "Conv1D":
            raise TuningError(f"{where}: LoRA on {module!r} ({type(found_modules[module]).__name__}): slimtune reads "
                              "AdapterHub's LoRA on plain linear layers (not GPT-2's merged q/k/v)")
        state[f"{module}.{found.group(2)}"] = tensor
        if module not in targets:
            targets.append(module)
    if not targets:
        raise TuningError(f"{where} holds no LoRA weights named {name!r}")
    shapes = {tuple(state[f"{t}.lora_A"].shape)[0] for t in targets if f"{t}.lora_A" in state}
    if shapes != {rank}:
        raise TuningFileError(f"{where}: LoRA weights of rank {sorted(shapes)}, its config says r={rank}")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    method = LoRA(rank=rank, alpha=float(alpha), dropout=float(dropout),
                  targets=tuple(sorted(targets, key=order.__getitem__)))
    return method, state


def _module_for(path: str, found: dict[str, nn.Module], where: str) -> str:
    if path in found:
        return path
    matches = [n for n in found if n.endswith("." + path)]  # saved from the body, loaded onto a model with a head
    if len(matches) != 1:
        raise ModelMismatchError(f"{where} has LoRA weights for {path!r}, which is no layer of this model; was it made "
                                 "for another architecture?")
    return matches[0]


# --- prefix tuning -------------------------------------------------------------------------------------------

PREFIX_KEY = r"(?:.+\.)?prefix_tunings\.{name}\.([^.]+)\.(wte\.weight|control_trans(?:\.[02]\.(?:weight|bias))?)"
PREFIX_PARTS = {False: ("wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
                        "control_trans.2.bias"), True: ("control_trans",)}


def _read_prefix(inner: dict, config: dict, name: str, tensors: dict, model: nn.Module, where: str
                 ) -> tuple[PrefixTuning, dict[str, torch.Tensor]]:
    """AdapterHub's prefix, computed once (see the module's docstring), as a PrefixTuning(positions='from-zero')."""
    _refuse(inner, PREFIX_REFUSED, where)
    if inner.get("leave_out"):
        raise TuningError(f"{where} leaves out layers (`leave_out`: {str(inner['leave_out'])[:40]}); slimtune's prefix "
                          "is at every self-attention layer")
    if modules.is_encoder_decoder(model):
        raise TuningError(f"{where}: AdapterHub's prefixes on an encoder-decoder model (`encoder_prefix`, `cross_prefix`: "
                          "encoder, decoder and cross-attention prefixes of their own) have no equivalent in slimtune")
    flat, k = inner.get("flat", False), inner.get("prefix_length")
    if not isinstance(flat, bool) or not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise TuningFileError(f"{where}: a prefix tuning needs flat (true or false) and a positive prefix_length, got "
                              f"flat={str(flat)[:20]!r}, prefix_length={str(k)[:20]!r}")
    activation = PREFIX_ACTIVATIONS.get(_activation_name(inner, config))
    if activation is None and not flat:
        raise TuningError(f"{where} uses non_linearity {str(inner.get('non_linearity'))[:40]!r} in its prefix MLP; "
                          f"slimtune computes {', '.join(PREFIX_ACTIVATIONS)}")
    if inner.get("dropout"):
        warnings.warn(f"{where} trains with dropout on its prefix; slimtune's prefix has none (it does nothing in "
                      "evaluation)", stacklevel=4)
    parts = _prefix_parts(tensors, name, flat, where)
    component = PrefixComponent(model)
    try:
        shapes = component.shapes()
    finally:
        component.close()  # only its sites were needed: drop its position hook
    if len(set(shapes.values())) != 1:
        raise TuningError(f"{where}: this model's layers have different key/value shapes {sorted(set(shapes.values()))}; "
                          "AdapterHub's prefix has one shape for every layer")
    (kv, head_dim), layers = next(iter(shapes.values())), len(shapes)
    size = layers * 2 * kv * head_dim
    if flat:
        table = parts["control_trans"]
        if table.shape != (k * size,):
            raise ModelMismatchError(f"{where}: its prefix has {table.numel()} values, this model needs {k * size} "
                                     f"(prefix_length {k} x {layers} layers x 2 x {kv} key/value heads x {head_dim})")
    else:
        embedding = parts["wte.weight"]
        hidden = tuple(parts["control_trans.0.weight"].shape)
        if embedding.shape[0] != k or parts["control_trans.2.weight"].shape[0] != size:
            raise ModelMismatchError(f"{where}: its prefix MLP makes {parts['control_trans.2.weight'].shape[0]} values "
                                     f"at {embedding.shape[0]} positions, this model needs {size} (layers x 2 x "
                                     f"key/value heads x head size) at prefix_length {k}")
        if inner.get("bottleneck_size", hidden[0]) != hidden[0] or hidden[1] != embedding.shape[1]:
            raise TuningFileError(f"{where}: its prefix MLP's first layer has shape {hidden}, its config and embedding "
                                  "say otherwise")
        with torch.no_grad():  # AdapterHub's PrefixTuning.forward in evaluation, once
            h = activation(nn.functional.linear(embedding.float(), parts["control_trans.0.weight"].float(),
                                                parts["control_trans.0.bias"].float()))
            table = nn.functional.linear(h, parts["control_trans.2.weight"].float(), parts["control_trans.2.bias"].float())
    table = table.float().reshape(k, layers, 2, kv, head_dim).permute(1, 2, 3, 0, 4)
    state = {f"{site}.prefix": table[i].contiguous() for i, site in enumerate(shapes)}
    return PrefixTuning(length=k, reparam=None, init="random", positions="from-zero"), state


def _prefix_parts(tensors: dict, name: str, flat: bool, where: str) -> dict[str, torch.Tensor]:
    """The pool's tensors by part (each saved once per layer too, as the same module: the copies must agree)."""
    key = re2.compile(PREFIX_KEY.format(name=re2.escape(name)))
    parts: dict[str, torch.Tensor] = {}
    for k, tensor in tensors.items():
        found = key.fullmatch(k)
        if found is None:
            raise TuningError(f"{where}: tensor {k!r} is not part of a prefix tuning named {name!r}")
        location, part = found.group(1), found.group(2)
        if location != "self_prefix":
            raise TuningError(f"{where} has prefixes at AdapterHub location {location[:40]!r} (e.g. cross_prefix: "
                              "cross-attention prefixes); slimtune reads self-attention prefixes (self_prefix)")
        if part not in PREFIX_PARTS[flat]:
            raise TuningError(f"{where}: tensor {k!r} does not fit its config (flat={str(flat).lower()})")
        if part in parts and not torch.equal(parts[part], tensor):
            raise TuningFileError(f"{where}: the copies of its prefix's {part} differ")
        parts[part] = tensor
    missing = [p for p in PREFIX_PARTS[flat] if p not in parts]
    if missing:
        raise TuningError(f"{where} holds no prefix tuning named {name!r} (missing {', '.join(missing)})")
    return parts


# --- heads ---------------------------------------------------------------------------------------------------

def _read_head(folder: Path, model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """A static head's weights ({`classifier.weight`: ...}), or {} when the folder has none."""
    has_head = (folder / HEAD_CONFIG).is_file() or any((folder / n).is_file() for n in HEAD_WEIGHTS)
    if not has_head:
        return {}
    if not (folder / HEAD_CONFIG).is_file():
        raise TuningFileError(f"{where} has head weights but no {HEAD_CONFIG}")
    head_config = storage.load_json((folder / HEAD_CONFIG).read_bytes(), f"{where}: {HEAD_CONFIG}")
    if not isinstance(head_config, dict):
        raise TuningFileError(f"{where}: {HEAD_CONFIG} must be a JSON object")
    flex = head_config.get("config")
    if flex is not None:
        head_type = flex.get("head_type") if isinstance(flex, dict) else None
        raise TuningError(f"{where} has one of AdapterHub's flex heads (head type {str(head_type)[:40]!r}, from an "
                          "*AdapterModel class), which slimtune has no equivalent for; slimtune reads the heads of "
                          "transformers' own model classes (e.g. BertForSequenceClassification)")
    if not modules.head_names(model):
        raise TuningError(f"{where} carries a task head ({str(head_config.get('model_class'))[:60]}), but "
                          f"{type(model).__name__} has none")
    if head_config.get("model_class") != type(model).__name__:
        raise ModelMismatchError(f"{where}: its head was made for {str(head_config.get('model_class'))[:60]!r}, this "
                                 f"model is {type(model).__name__}")
    return _read_weights(folder, HEAD_WEIGHTS, where)
