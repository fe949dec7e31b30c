"""Reading and writing HF PEFT tuning folders (adapter_config.json + adapter_model.safetensors).

A PEFT folder has no model fingerprint, so what makes it fit a model is checked on its tensors:
module names and shapes (LoRA), the number of layers, key/value heads and head size (prefix
tuning), the embedding width (prompt tuning). Only what slimtune computes exactly as PEFT does is
read or written; everything else is refused with the feature named.

The three forms, PEFT's on the left:

- LoRA: `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], scaled by
  lora_alpha / r (lora_alpha / sqrt(r) with use_rslora, slimtune's `rslora=True`), are slimtune's
  `<module>.lora_A` / `.lora_B`. GPT-2's Conv1D layers take the same A and B (PEFT sets
  fan_in_fan_out for them, which only matters when merging).
- DoRA (LoRA with use_dora): the same A and B, and `.lora_magnitude_vector` [out], slimtune's
  `<module>.magnitude`, read as slimtune's `DoRA`.
- IA3: `base_model.model.<module>.ia3_l`, [1, in] on a feed-forward module (it scales the input),
  [out, 1] on any other (the output), is slimtune's `<module>.ia3` [in] or [out]; which modules are
  feed-forward is read from that shape.
- Prompt tuning: `prompt_embeddings` [k, d] is slimtune's `prompt`. PEFT puts it before the whole
  padded row ([prompt, pad, x]) with positions counted from the first column; slimtune puts it
  right before the row's own tokens ([pad, prompt, x]) with positions from the mask. The two agree
  on unpadded rows, and slimtune's padded row equals PEFT's row alone.
- Prefix tuning: `prompt_embeddings` [k, layers * 2 * kv_heads * head_dim] is, per position, every
  layer's key then value, heads then head size; PEFT puts it in the KV cache (keys as given, no
  rotation), real tokens' positions start at k. slimtune's `<attention>.prefix` [2, kv_heads, k,
  head_dim] is the same keys and values, put in by the attention function instead of the cache.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from . import adapterhub_format, modules, storage
from .errors import ModelMismatchError, TuningError, TuningFileError
from .methods import IA3, DoRA, LoRA, Method, PrefixTuning, PromptTuning
from .methods.ia3 import ia3_sites
from .methods.prefix import PrefixComponent

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"  # older PEFT releases
PREFIX = "base_model.model."  # what PEFT puts before a module's name in LoRA weight names
READS = ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING")

# LoRA options that do not change what the saved A and B compute (or are checked on their own).
LORA_KNOWN = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying",
    "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "megatron_core", "modules_to_save",
    "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision", "target_modules", "task_type",
    "use_dora", "use_rslora",
}
IA3_KNOWN = {
    "auto_mapping", "base_model_name_or_path", "exclude_modules", "fan_in_fan_out", "feedforward_modules",
    "inference_mode", "init_ia3_weights", "modules_to_save", "peft_type", "peft_version", "revision", "target_modules",
    "task_type",
}
# Say what a refused LoRA option does, so the message tells why slimtune cannot hold it.
LORA_REFUSED = {
    "lora_bias": "lora_bias adds a trained bias to lora_B; slimtune's lora_B has no bias",
    "target_parameters": "target_parameters puts LoRA on bare parameters (e.g. MoE experts); slimtune's LoRA is on linear layers",
    "trainable_token_indices": "trainable_token_indices trains some embedding rows; slimtune's LoRA has no such part",
    "layer_replication": "layer_replication duplicates layers of the base model",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after given tokens",
    "use_qalora": "QA-LoRA (use_qalora) pools the input before lora_A",
}
# init_lora_weights values that change the base model's weights: the saved A and B assume those weights.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
# Model types whose prefix PEFT puts in the cache in its own way (special cache classes, per-layer shapes).
SPECIAL_PREFIX_CACHES = ("gemma2", "gemma3_text", "gemma4", "bloom", "gpt_bigcode")
NO_EQUIVALENT = {
    "adapter": "bottleneck adapters (Houlsby/Pfeiffer)",
    "bitfit": "BitFit (training only the biases)",
    "full": "full fine-tuning (save the model itself with save_pretrained)",
}


def is_peft_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG).is_file()


# --- reading -----------------------------------------------------------------------------------

def read(path: str | os.PathLike, model: nn.Module) -> tuple[Method, dict[str, torch.Tensor]]:
    """A PEFT folder's tuning as slimtune's method config and saved-form tensors, checked to fit `model`; an
    AdapterHub folder (the same adapter_config.json, written by `adapters`) is read by `adapterhub_format`."""
    folder = Path(path)
    config = _read_config(folder)
    if adapterhub_format.is_adapterhub_config(config):  # AdapterHub writes the same file name
        return adapterhub_format.read(folder, config, model)
    peft_type = config.get("peft_type")
    readers = {"LORA": _read_lora, "IA3": _read_ia3, "PROMPT_TUNING": _read_prompt, "PREFIX_TUNING": _read_prefix}
    if peft_type not in readers:
        raise TuningError(
            f"'{folder}' holds a PEFT tuning of type {peft_type!r}, which slimtune has no equivalent for; "
            f"slimtune reads PEFT types {', '.join(READS)}"
        )
    if config.get("modules_to_save"):
        raise TuningError(
            f"'{folder}' uses modules_to_save {config['modules_to_save']!r} (trained full copies of those modules, "
            "e.g. a classification head); slimtune reads PEFT tunings without modules_to_save"
        )
    _warn_other_base(config, model, folder)
    return readers[peft_type](config, _read_weights(folder), model, folder)


def _read_config(folder: Path) -> dict:
    config = storage.load_json((folder / CONFIG).read_bytes(), f"'{folder / CONFIG}'")
    if not isinstance(config, dict):
        raise TuningFileError(f"'{folder / CONFIG}' is not a PEFT config (expected a JSON object)")
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS).is_file():
        try:
            return load_tensors((folder / WEIGHTS).read_bytes())
        except Exception as err:  # safetensors raises its own error types
            raise TuningFileError(f"'{folder / WEIGHTS}' cannot be read as safetensors: {err}") from err
    if (folder / PICKLED_WEIGHTS).is_file():
        # weights_only: tensors in plain containers, no code runs on load.
        return torch.load(folder / PICKLED_WEIGHTS, map_location="cpu", weights_only=True)
    raise TuningFileError(f"PEFT folder '{folder}' has {CONFIG} but no {WEIGHTS} (or {PICKLED_WEIGHTS})")


def _warn_other_base(config: dict, model: nn.Module, folder: Path) -> None:
    """Names are no proof (a local copy of a hub model has another path), so a differing name only warns;
    shapes are checked for real when the tuning is built."""
    saved = config.get("base_model_name_or_path") or ""
    current = getattr(model.config, "_name_or_path", "") or ""
    if saved and current and Path(saved).name != Path(current).name:
        warnings.warn(
            f"PEFT tuning '{folder}' was made on {saved!r}, this model was loaded from {current!r}; "
            "shapes fit, but make sure it is the same base model",
            stacklevel=3,
        )


def _prompt_embeddings(tensors: dict[str, torch.Tensor], folder: Path) -> torch.Tensor:
    if "prompt_embeddings" not in tensors:
        raise TuningFileError(
            f"'{folder}' has no 'prompt_embeddings' tensor (it holds {sorted(tensors)[:4]}); "
            "slimtune reads PEFT prompt-learning folders as PEFT saves them"
        )
    return tensors["prompt_embeddings"]


def _one_submodule(config: dict, folder: Path) -> None:
    """Two submodules are PEFT's encoder-decoder form (one prompt for each side)."""
    count = config.get("num_transformer_submodules") or 1
    if count != 1:
        raise TuningError(
            f"'{folder}' has num_transformer_submodules={count} (PEFT's encoder-decoder form); "
            "slimtune reads prompt and prefix tunings of decoder-only causal LMs (num_transformer_submodules=1)"
        )


def _read_prompt(config: dict, tensors: dict, model: nn.Module, folder: Path) -> tuple[Method, dict]:
    _check_decoder(model, "PEFT prompt tuning")
    _one_submodule(config, folder)
    embeddings = _prompt_embeddings(tensors, folder)
    k = int(config.get("num_virtual_tokens") or embeddings.shape[0])
    if embeddings.dim() != 2 or embeddings.shape[0] != k:
        raise ModelMismatchError(
            f"'{folder}': prompt_embeddings has shape {tuple(embeddings.shape)}, expected [{k}, token_dim] "
            f"for num_virtual_tokens={k}"
        )
    # PromptComponent.from_state checks the width against this model's embeddings.
    return PromptTuning(length=k), {"prompt": embeddings}


def _read_prefix(config: dict, tensors: dict, model: nn.Module, folder: Path) -> tuple[Method, dict]:
    _one_submodule(config, folder)
    names, kv, head_dim = _prefix_sites(model, "PEFT prefix tuning")
    layers = len(names)
    saved = {"num_layers": config.get("num_layers"), "num_attention_heads": config.get("num_attention_heads"),
             "token_dim": config.get("token_dim")}
    needed = {"num_layers": layers, "num_attention_heads": kv, "token_dim": kv * head_dim}
    for field, value in needed.items():
        if saved[field] is not None and saved[field] != value:
            raise ModelMismatchError(
                f"'{folder}' has {field}={saved[field]}, this {type(model).__name__} needs {value} "
                f"({layers} layers, {kv} key/value heads of size {head_dim}); it was made for another model"
                + (" or by a PEFT release that ignored grouped-query attention" if field != "num_layers" else "")
            )
    embeddings = _prompt_embeddings(tensors, folder)
    k = int(config.get("num_virtual_tokens") or embeddings.shape[0])
    if tuple(embeddings.shape) != (k, layers * 2 * kv * head_dim):
        raise ModelMismatchError(
            f"'{folder}': prompt_embeddings has shape {tuple(embeddings.shape)}, this model needs "
            f"({k}, {layers * 2 * kv * head_dim}) = (num_virtual_tokens, layers * 2 * kv_heads * head_dim)"
        )
    # Per position: layer, then key/value, then head, then head size.
    table = embeddings.reshape(k, layers, 2, kv, head_dim).permute(1, 2, 3, 0, 4)
    state = {f"{name}.prefix": table[i].contiguous() for i, name in enumerate(names)}
    return PrefixTuning(length=k, reparam=None, init="random"), state


def _read_lora(config: dict, tensors: dict, model: nn.Module, folder: Path) -> tuple[Method, dict]:
    _check_lora_config(config, folder)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or not isinstance(alpha, (int, float)):
        raise TuningFileError(f"'{folder}': a LoRA config needs an integer r and a number lora_alpha, got r={r!r}, "
                              f"lora_alpha={alpha!r}")
    dora = bool(config.get("use_dora"))
    weights = _lora_weights(tensors, folder, dora)
    what = "DoRA" if dora else "LoRA"
    names = _linear_layers(model, weights, what, folder)
    method = (DoRA if dora else LoRA)(
        rank=r, alpha=float(alpha), dropout=float(config.get("lora_dropout") or 0.0),
        targets=_selecting(model, config.get("target_modules"), names, folder, "target_modules"),
        rslora=bool(config.get("use_rslora")),
    )
    state = {}
    for name in names:
        state[f"{name}.lora_A"] = weights[name]["lora_A"]
        state[f"{name}.lora_B"] = weights[name]["lora_B"]
        if dora:
            state[f"{name}.magnitude"] = weights[name]["lora_magnitude_vector"]
    # LoRAComponent.from_state checks every shape (rank, in and out features) against this model.
    return method, state


def _linear_layers(model: nn.Module, weights: dict, what: str, folder: Path) -> list[str]:
    """The modules `weights` (by module name) are for, in the model's order, checked to be linear layers of `model`."""
    present = dict(model.named_modules())
    missing = sorted(name for name in weights if name not in present)
    if missing:
        raise ModelMismatchError(
            f"'{folder}' has {what} weights for {missing[0]!r}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}, "
            f"which {type(model).__name__} does not have (its linear layers end in: {modules.describe_linears(model)}); "
            "it was made for another architecture"
        )
    for name in weights:
        if not modules.is_linear(present[name]):
            raise TuningError(
                f"'{folder}' puts {what} on {name!r}, a {type(present[name]).__name__}; "
                f"slimtune's {what} is on linear layers (nn.Linear, Conv1D) only"
            )
    return [name for name in present if name in weights]


def _read_ia3(config: dict, tensors: dict, model: nn.Module, folder: Path) -> tuple[Method, dict]:
    unknown = {k: v for k, v in config.items() if k not in IA3_KNOWN and v not in (None, False, {}, [], "")}
    if unknown:
        raise TuningError(f"'{folder}' sets PEFT IA3 options slimtune does not know: {unknown}; slimtune reads IA3 "
                          "with target_modules and feedforward_modules on linear layers")
    vectors = {}
    for key, tensor in tensors.items():
        if not (key.startswith(PREFIX) and key.endswith(".ia3_l")):
            raise TuningError(f"'{folder}' holds the tensor {key!r}, which is not an IA3 vector of a linear layer; "
                              f"slimtune reads tensors named {PREFIX}<module>.ia3_l")
        vectors[key[len(PREFIX):-len(".ia3_l")]] = tensor
    names = _linear_layers(model, vectors, "IA3", folder)
    present = dict(model.named_modules())
    state, feedforward = {}, []
    for name in names:
        d_in, d_out = modules.linear_features(present[name])
        shape = tuple(vectors[name].shape)
        if shape not in ((1, d_in), (d_out, 1)):
            raise ModelMismatchError(
                f"'{folder}': the IA3 vector of {name!r} has shape {shape}, this model needs (1, {d_in}) (a feed-forward "
                f"module, scaling its input) or ({d_out}, 1) (scaling its output); it was made for a model of another size"
            )
        if shape == (1, d_in) and shape != (d_out, 1):  # PEFT's shape says which: [1, in] for its feed-forward modules
            feedforward.append(name)
        state[f"{name}.ia3"] = vectors[name].reshape(-1)
    method = IA3(targets=_selecting(model, config.get("target_modules"), names, folder, "target_modules"),
                 feedforward=_selecting(model, config.get("feedforward_modules"), feedforward, folder, "feedforward_modules"))
    return method, state


def _check_lora_config(config: dict, folder: Path) -> None:
    """Refuse what changes the computation beyond (alpha / r) B A x, naming the option."""
    supported = "slimtune reads LoRA with one r and lora_alpha, bias='none', on linear layers"
    for option, what in LORA_REFUSED.items():
        if config.get(option):
            raise TuningError(f"'{folder}': {what}; {supported}")
    if (config.get("bias") or "none") != "none":
        raise TuningError(f"'{folder}' has bias={config['bias']!r} (trains the base layers' biases too); {supported}")
    for option, base in (("rank_pattern", config.get("r")), ("alpha_pattern", config.get("lora_alpha"))):
        other = {k: v for k, v in (config.get(option) or {}).items() if v != base}
        if other:
            raise TuningError(f"'{folder}' has {option} {other} (another value than {base} for some modules); {supported}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise TuningError(
            f"'{folder}' has init_lora_weights={init!r}, which changes the base model's weights, and its A and B "
            "assume those; convert it to a plain LoRA with PEFT first (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...))"
        )
    known = LORA_KNOWN | set(LORA_REFUSED)
    unknown = {k: v for k, v in config.items() if k not in known and v not in (None, False, {}, [], "")}
    if unknown:
        raise TuningError(f"'{folder}' sets PEFT LoRA options slimtune does not know: {unknown}; {supported}")


def _lora_weights(tensors: dict[str, torch.Tensor], folder: Path, dora: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"lora_A": .., "lora_B": .. (, "lora_magnitude_vector": ..)}} from PEFT's weight names,
    refusing any other tensor."""
    parts = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight"}
    if dora:
        parts["lora_magnitude_vector"] = ".lora_magnitude_vector"
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for part, suffix in parts.items():
            if key.startswith(PREFIX) and key.endswith(suffix):
                out.setdefault(key[len(PREFIX):-len(suffix)], {})[part] = tensor
                break
        else:
            raise TuningError(
                f"'{folder}' holds the tensor {key!r}, which is not a LoRA A or B {'or DoRA magnitude ' if dora else ''}"
                "of a linear layer (embedding LoRA, biases and modules_to_save are not supported); slimtune reads tensors "
                f"named {PREFIX}<module>{' / '.join(parts.values())}"
            )
    for name, found in out.items():
        if len(found) != len(parts):
            raise TuningFileError(f"'{folder}' has only {sorted(found)} for {name!r}; it needs {sorted(parts)}")
    return out


def _selecting(model: nn.Module, patterns, names: list[str], folder: Path, field: str) -> tuple[str, ...] | str:
    """PEFT's own patterns (`field`: target_modules, feedforward_modules) when, on this model, they pick exactly
    the layers `names` (same matching rule as slimtune's), else the layers' full names (exclude_modules and
    layers_to_transform narrow PEFT's choice in ways target_modules alone does not say)."""
    what = f"'{folder}': PEFT {field}"
    candidate = modules.check_patterns(patterns, what)  # a string is matched by RE2, as slimtune's own
    if candidate:
        candidate = candidate if isinstance(candidate, str) else tuple(sorted(candidate))  # PEFT's set, in any order
        if [n for n, _ in modules.find_linears(model, candidate, what)] == names:
            return candidate
    return tuple(names)


# --- writing -----------------------------------------------------------------------------------

def write(tuned, path: str | os.PathLike) -> Path:
    """Write `tuned` as a PEFT folder that `peft.PeftModel.from_pretrained(model, path)` loads; the
    weights first and the config last, each atomically, so a half-written folder never looks whole."""
    method = tuned.method
    writers = {"lora": _lora_folder, "dora": _lora_folder, "ia3": _ia3_folder, "prompt": _prompt_folder,
               "prefix": _prefix_folder}
    if method.kind not in writers:
        what = NO_EQUIVALENT.get(method.kind, f"{method.kind} tunings")
        raise TuningError(
            f"PEFT has no equivalent of slimtune's {what}, so it cannot be saved with format='peft'; "
            "format='peft' writes LoRA, DoRA, IA3, prompt tuning and prefix tuning (save it with format='slimtune')"
        )
    state = tuned.bank.state(tuned.user)
    if any(name.startswith("head.") for name in state):
        raise TuningError(
            f"{type(tuned.model).__name__} has a task head trained with the tuning, which PEFT would keep as "
            "modules_to_save; format='peft' writes tunings of models without a task head"
        )
    config, tensors = writers[method.kind](tuned, method, state)
    folder = Path(path)
    weights = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    storage.atomic_write(folder / WEIGHTS, save_tensors(weights, metadata={"format": "pt"}))
    storage.atomic_write_json(folder / CONFIG, config, sort_keys=True)
    return folder


def _common(model: nn.Module, peft_type: str, task_type: str | None) -> dict:
    return {
        "auto_mapping": None,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "inference_mode": True,
        "modules_to_save": None,
        "peft_type": peft_type,
        "revision": None,
        "task_type": task_type,
    }


def _task_type(model: nn.Module) -> str | None:
    return "CAUSAL_LM" if modules.is_causal_decoder(model) else "SEQ_2_SEQ_LM" if modules.is_encoder_decoder(model) else None


def _lora_folder(tuned, method: LoRA, state: dict) -> tuple[dict, dict]:
    model = tuned.model
    names = [key[: -len(".lora_A")] for key in state if key.endswith(".lora_A")]
    found = dict(model.named_modules())
    dora = isinstance(method, DoRA)
    config = _common(model, "LORA", _task_type(model)) | {
        "alpha_pattern": {},
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": any(not isinstance(found[n], nn.Linear) for n in names),  # GPT-2's Conv1D
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": int(method.alpha) if float(method.alpha).is_integer() else method.alpha,
        "lora_dropout": method.dropout,
        "r": method.rank,
        "rank_pattern": {},
        "target_modules": _peft_targets(model, method.targets, names),
        "use_dora": dora,
        "use_rslora": method.rslora,
    }
    tensors = {}
    for name in names:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = state[f"{name}.lora_A"]
        tensors[f"{PREFIX}{name}.lora_B.weight"] = state[f"{name}.lora_B"]
        if dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = state[f"{name}.magnitude"]
    return config, tensors


def _ia3_folder(tuned, method: IA3, state: dict) -> tuple[dict, dict]:
    model = tuned.model
    sites = ia3_sites(model, method)
    found = dict(model.named_modules())
    targets = _peft_targets(model, method.targets, list(sites))
    feedforward = _peft_feedforward(targets, method.feedforward, sites)
    config = _common(model, "IA3", _task_type(model)) | {
        "exclude_modules": None,
        "fan_in_fan_out": any(not isinstance(found[n], nn.Linear) for n in sites),  # GPT-2's Conv1D
        "feedforward_modules": feedforward,
        "init_ia3_weights": True,
        "target_modules": targets,
    }
    tensors = {f"{PREFIX}{name}.ia3_l": state[f"{name}.ia3"].reshape((1, -1) if ff else (-1, 1))
               for name, (_, ff) in sites.items()}
    return config, tensors


def _peft_feedforward(targets: list[str] | str, feedforward, sites: dict[str, tuple[int, bool]]) -> list[str] | str:
    """feedforward_modules that make PEFT treat exactly the feed-forward ones of `sites` so. PEFT decides it among
    its targets, by a full match for a string and by a plain `endswith` for a list, and wants a list to be a
    subset of a list of target_modules."""
    wanted = sorted(n for n, (_, ff) in sites.items() if ff)
    candidates = [feedforward, sorted({n.rsplit(".", 1)[-1] for n in wanted}), wanted]
    for candidate in candidates:
        if candidate is None:
            continue
        fits = isinstance(candidate, str) or isinstance(targets, str) or set(candidate) <= set(targets)
        if fits and sorted(n for n in sites if _peft_feedforward_match(candidate, n)) == wanted:
            return candidate if isinstance(candidate, str) else list(candidate)
    raise TuningError(f"IA3's feed-forward modules {wanted[:3]} cannot be named in PEFT's feedforward_modules so that PEFT "
                      "picks exactly them among its target_modules")


def _peft_targets(model: nn.Module, targets, names: list[str]) -> list[str] | str:
    """target_modules that make PEFT pick exactly `names`. PEFT matches every module, not only linear
    ones, so slimtune's own patterns (or the layers' last names) are kept only when they pick nothing else."""
    every = [n for n, _ in model.named_modules() if n]
    for candidate in (targets, sorted({n.rsplit(".", 1)[-1] for n in names})):
        if candidate and sorted(filter(modules.matcher(candidate), every)) == sorted(names):
            return candidate if isinstance(candidate, str) else list(candidate)
    return list(names)


def _peft_feedforward_match(patterns: str | Sequence[str], name: str) -> bool:
    if isinstance(patterns, str):
        return modules.compile_pattern(patterns, "IA3 feedforward")(name)
    return name.endswith(tuple(patterns))


def _prompt_folder(tuned, method: PromptTuning, state: dict) -> tuple[dict, dict]:
    model = tuned.model
    _check_decoder(model, "prompt tuning in PEFT's format")
    prompt = state["prompt"]
    config = modules.text_config(model)
    out = _common(model, "PROMPT_TUNING", "CAUSAL_LM") | {
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "num_transformer_submodules": 1,
        "num_virtual_tokens": prompt.shape[0],
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "token_dim": prompt.shape[1],
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }
    return out, {"prompt_embeddings": prompt}


def _prefix_folder(tuned, method: PrefixTuning, state: dict) -> tuple[dict, dict]:
    if method.positions != "after-prefix":
        raise TuningError(f"this prefix tuning keeps the real tokens at positions 0.. (positions={method.positions!r}, "
                          "as AdapterHub's); PEFT's prefix tuning puts them after the prefix, so it would compute "
                          "something else; save it with format='slimtune'")
    model = tuned.model
    names, kv, head_dim = _prefix_sites(model, "prefix tuning in PEFT's format")
    k = method.length
    table = torch.stack([state[f"{name}.prefix"] for name in names])  # [layers, 2, kv, k, head_dim]
    embeddings = table.permute(3, 0, 1, 2, 4).reshape(k, -1)
    config = _common(model, "PREFIX_TUNING", "CAUSAL_LM") | {
        "encoder_hidden_size": kv * head_dim,
        "init_weights": None,
        "num_attention_heads": kv,  # PEFT's prefix is per key/value head (grouped-query attention)
        "num_layers": len(names),
        "num_transformer_submodules": 1,
        "num_virtual_tokens": k,
        "prefix_projection": False,  # the computed prefix, whatever trained it
        "token_dim": kv * head_dim,
    }
    return config, {"prompt_embeddings": embeddings}


# --- where the two forms agree -----------------------------------------------------------------

def _check_decoder(model: nn.Module, what: str) -> None:
    """PEFT's encoder and encoder-decoder prompt forms differ from slimtune's (a prompt for each side,
    the prefix in an encoder-decoder cache); decoder-only causal LMs are where they are the same."""
    if not modules.is_causal_decoder(model):
        raise TuningError(
            f"{what}: slimtune and PEFT compute the same thing only on decoder-only causal LMs; "
            f"{type(model).__name__} is not one (LoRA converts on any model)"
        )


def _prefix_sites(model: nn.Module, what: str) -> tuple[list[str], int, int]:
    """The self-attention modules in layer order and their one (kv_heads, head_dim), or an error
    where PEFT's cache prefix and slimtune's attention prefix are not the same computation."""
    _check_decoder(model, what)
    config = modules.text_config(model)
    model_type = getattr(config, "model_type", "")
    kinds = sorted(set(getattr(config, "layer_types", None) or ["full_attention"]))
    reasons = []
    if model_type in SPECIAL_PREFIX_CACHES:
        reasons.append(f"PEFT puts the prefix of {model_type} models into their cache in a way of its own")
    if kinds != ["full_attention"]:
        reasons.append(f"its layers are of several kinds ({', '.join(kinds)})")
    if reasons:
        raise TuningError(
            f"{what}: {type(model).__name__} is not supported: {' and '.join(reasons)}, where PEFT's cache prefix is "
            "not known to be slimtune's attention prefix. PEFT prefix tuning converts on decoders whose every layer "
            "is full attention (GPT-2, Llama, Mistral, Qwen2, ...); on this model, save prefix tuning with format='slimtune' "
            "(LoRA and prompt tuning convert on any decoder)"
        )
    component = PrefixComponent(model)
    try:
        shapes = component.shapes()
    finally:
        component.close()  # only its sites were needed: drop its position hook
    if len({tuple(s) for s in shapes.values()}) != 1:
        raise TuningError(
            f"{what}: {type(model).__name__}'s layers have different key/value shapes {sorted(set(shapes.values()))}; "
            "PEFT's prefix has one shape for every layer"
        )
    layers = getattr(config, "num_hidden_layers", len(shapes))
    if layers != len(shapes):
        raise TuningError(f"{what}: {type(model).__name__} has {layers} layers but {len(shapes)} self-attention modules; "
                          "PEFT's prefix has one entry per layer")
    kv, head_dim = next(iter(shapes.values()))
    return list(shapes), kv, head_dim


__all__ = ["CONFIG", "is_peft_folder", "read", "write"]
