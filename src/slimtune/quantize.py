"""A quantised frozen base: the model's linear weights stored in 4 or 8 bits, the tunings beside them in full precision.

The tunings never write the base, so its weights need not be trainable, only differentiable through: LoRA,
adapters, prefix and prompt tuning, IA3 and BitFit train over a quantised base as over an fp32 one (the
gradient reaches them through the frozen quantised layers), as QLoRA (Dettmers et al., 2023) does with
4-bit NormalFloat. What needs the weights themselves cannot: model tuning trains them, DoRA needs their
norm, and merging a tuning writes into them.

The schemes go through transformers' own quantisation configs, applied as the checkpoint loads:

- ``nf4``: bitsandbytes' 4-bit NormalFloat (blocks of 64 weights, one fp32 scale each), computing in fp32.
  Its layers are ``bitsandbytes.nn.Linear4bit``, a subclass of ``nn.Linear``, so every method finds them.
- ``int8``: torchao's int8 weight-only quantisation (one scale per output row). The layers stay ``nn.Linear``;
  their weight becomes a tensor subclass (``Int8Tensor``) that reports the dtype it was quantised from.

Task heads (a language-model head, a new classification head) stay in full precision: a new head is
trained with the tuning, and the LM head of most small models is tied to the input embedding.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import TuningError
from .modules import HEAD_NAMES, is_linear


@dataclass(frozen=True)
class Scheme:
    package: str  # the PyPI package that implements it
    description: str


SCHEMES: dict[str, Scheme] = {
    "nf4": Scheme("bitsandbytes", "bitsandbytes 4-bit NormalFloat"),
    "int8": Scheme("torchao", "torchao int8 weight-only"),
}


def check_scheme(quantize: str | None) -> str | None:
    """`quantize` if it names a scheme (or is None: the base as stored), else a TuningError saying which exist."""
    if quantize is None or quantize in SCHEMES:
        return quantize
    accepted = ", ".join(f"{name!r} ({scheme.description})" for name, scheme in SCHEMES.items())
    raise TuningError(f"quantize={quantize!r} is not a quantisation scheme; use one of {accepted}, or None for the "
                      "weights as stored")


def quantization_config(quantize: str) -> Any:
    """transformers' quantisation config for a scheme, to pass to `from_pretrained` as `quantization_config`."""
    scheme = SCHEMES[check_scheme(quantize)]
    if importlib.util.find_spec(scheme.package) is None:
        raise TuningError(f"quantize={quantize!r} needs the PyPI package {scheme.package}; install it with: "
                          f"pip install 'slimtune[quant]'")
    heads = [*HEAD_NAMES, "lm_head"]  # left in full precision: see the module's docstring
    if quantize == "nf4":
        from transformers import BitsAndBytesConfig

        # The skip list replaces transformers' default one, which is the LM head alone.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                  llm_int8_skip_modules=heads)
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=heads)


def check_quantised(model: nn.Module, quantize: str, name: str) -> None:
    """A TuningError if loading `name` with `quantize` quantised none of its layers (torchao takes `nn.Linear`
    only, so GPT-2's Conv1D layers would silently stay in full precision), or quantised layers that this
    machine's bitsandbytes kernel would compute with wrongly (`misread_nf4_layers`)."""
    if scheme_of(model) is None:
        kinds = sorted({type(m).__name__ for m in model.modules() if is_linear(m)})
        raise TuningError(f"quantize={quantize!r} quantised no layer of {name} ({type(model).__name__}): "
                          f"{SCHEMES[quantize].description} takes nn.Linear layers, and this model's are "
                          f"{', '.join(kinds)}; try another scheme or load it without quantize")
    if misread := misread_nf4_layers(model):
        raise TuningError(f"quantize='nf4' on this CPU would compute {len(misread)} layers of {name} with wrong weights "
                          f"({', '.join(misread[:3])}{', ...' if len(misread) > 3 else ''}): bitsandbytes' AVX512 CPU "
                          "kernel de-quantises a layer whose input width is not a multiple of its block of 64 weights "
                          "wrongly; load it with quantize='int8', or without quantize")


def misread_nf4_layers(model: nn.Module) -> list[str]:
    """The 4-bit layers that bitsandbytes' CPU kernel would de-quantise wrongly on this machine: on AVX512 CPUs
    bitsandbytes 0.50 de-quantises a weight whose rows are not a whole number of blocks wrongly (by up to 0.6
    of the weights' scale, checked here on a small weight once per process); elsewhere, none."""
    layers = [(name, module) for name, module in model.named_modules()
              if type(getattr(module, "weight", None)).__name__ == "Params4bit" and module.weight.device.type == "cpu"
              and module.weight.shape and module.in_features % module.weight.quant_state.blocksize != 0]
    return [name for name, _ in layers] if layers and _cpu_kernel_misreads_partial_blocks() else []


@functools.cache
def _cpu_kernel_misreads_partial_blocks() -> bool:
    import bitsandbytes.functional as F

    weight = torch.linspace(-1, 1, 32 * 32).reshape(32, 32)  # rows of 32: half a block of 64 each
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    code, flat = state.code.float(), packed.flatten()
    values = torch.stack([code[(flat >> 4).long()], code[(flat & 15).long()]], 1).flatten()
    expected = (values.view(-1, 64) * state.absmax.float()[:, None]).view_as(weight)
    return not torch.allclose(F.dequantize_4bit(packed, state), expected, atol=1e-6)


def prepare(model: nn.Module) -> None:
    """Ready a freshly loaded quantised model to be trained over and served: see the two steps."""
    keep_layout(model)
    detach_from_checkpoint(model)


def keep_layout(model: nn.Module) -> None:
    """Keep bitsandbytes' 4-bit weights in the layout they train in. On CPUs with AVX512-BF16, a layer's first
    forward in eval mode without gradients re-lays its weight out in place for a faster kernel, one with no
    backward: a training step after an evaluation (the trainer validates between steps) would then get no
    gradient through the frozen layers, with nothing but a warning to say so."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def detach_from_checkpoint(model: nn.Module) -> None:
    """Copy the full-precision tensors of a quantised model (embeddings, norms, heads) out of the checkpoint file
    they may still view, so that its memory map closes. Quantising reads the whole fp32 file, and while the
    input embedding alone keeps the map open, every page read stays resident: 0.4 GB of SmolLM2-135M's 0.54."""
    for tensor in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        if type(tensor.data) is torch.Tensor and tensor.dtype.is_floating_point:
            tensor.data = tensor.data.clone()


def scheme_of(model: nn.Module) -> str | None:
    """The scheme a model's linear weights were quantised with (one of `SCHEMES`), None if they are not."""
    for module in model.modules():
        if is_quantised(module):
            return "nf4" if type(module.weight).__name__ == "Params4bit" else "int8"
    return None


def is_quantised(module: nn.Module) -> bool:
    """Whether a layer's weight is stored quantised: packed integers (bitsandbytes), or a tensor subclass
    (torchao's, which reports the floating-point dtype it stands for)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    return not weight.dtype.is_floating_point or type(weight.data) is not torch.Tensor


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as a plain [out, in] tensor: de-quantised if it is stored quantised (a copy)."""
    weight = module.weight
    if not is_quantised(module):
        return weight
    if hasattr(weight, "quant_state"):  # bitsandbytes' 4-bit weight: packed pairs and a state to unpack them
        import bitsandbytes.functional as bnb

        return bnb.dequantize_4bit(weight.data, weight.quant_state)
    return weight.dequantize()


def refuse_quantised(model: nn.Module, what: str, instead: str = "") -> None:
    """A TuningError if `model`'s weights are quantised, for `what`, which must write or read the weights themselves;
    `instead`: what else the user can do."""
    scheme = scheme_of(model)
    if scheme is not None:
        raise TuningError(f"{what}, which it cannot do on a base whose linear weights are quantised "
                          f"({SCHEMES[scheme].description}); load the base without quantize for it{instead}")


def check_method(method: Any, model: nn.Module) -> None:
    """A TuningError for a method that cannot train over `model` if its weights are quantised: model tuning
    (it trains the weights) and a method that reads them (`Method.needs_base_weights`: DoRA needs their norm at
    every step)."""
    instead = ", or train LoRA, adapters or prefix tuning over the quantised base"
    if getattr(method, "writes_base", False):
        refuse_quantised(model, "model tuning trains every weight", instead)
    elif getattr(method, "needs_base_weights", ""):
        refuse_quantised(model, method.needs_base_weights, instead)


def parameter_count(module: nn.Module) -> int:
    """Parameters of a module, each counted as the weights it stands for (bitsandbytes packs two 4-bit weights
    in a byte, so its `numel()` is half that)."""
    seen = {id(p): p for p in module.parameters()}.values()
    return sum(_logical_numel(p) for p in seen)


def _logical_numel(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def model_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored, with what de-quantises them (scales, codebooks)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}.values()
    return sum(tensor_bytes(t) for t in tensors)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a tensor subclass (torchao) by its inner tensors, a bitsandbytes weight with its
    quantisation state; `numel() * element_size()` would count a torchao int8 weight as fp32."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(inner) for inner in (getattr(t, name) for name in names) if inner is not None)
    size = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)
    while state is not None:  # nested quantisation quantises the scales too, with a state of their own
        size += sum(x.numel() * x.element_size() for x in (state.absmax, state.code, state.offset)
                    if isinstance(x, torch.Tensor))
        state = state.state2 if state.nested else None
    return size
