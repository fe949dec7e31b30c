"""Adapter tuning (Houlsby et al., 2019; Pfeiffer et al., 2021): a bottleneck module inside every frozen layer.

    A(x) = W_up · σ(W_down · x),     W_down: d -> r,  W_up: r -> d,  W_up = 0 at the start

Three placements, with h a sub-layer's dropped-out output projection, r the residual it is added to and
LN the layer's own LayerNorm (on a pre-LN layer, where the sum is normalised later, LN is the identity):

- `"houlsby"` (the default, Houlsby's adapter): after the attention block and after the feed-forward block,
  `LN(h + A(h) + r)`. As in Houlsby's reference code (google-research/adapter-bert) and AdapterHub, the
  adapter reads the projection after its dropout: `h = drop(W_o · x)`.
- `"pfeiffer"` (Pfeiffer's adapter, AdapterHub's `SeqBnConfig`): after the feed-forward block only, reading
  the sub-layer's add-and-LayerNorm and adding back before it: `z = LN(h + r)`, `LN(h + r + A(z))` (BERT,
  RoBERTa, BART, OPT with `do_layer_norm_before=False` as opt-350m). On a pre-LN layer (GPT-2, the Llama family
  with Mistral, Qwen and Gemma, T5, mBART, OPT) that is the residual stream after the block, `s = h + r`:
  `s + A(s)`. Where the layer names cannot tell the two apart (BART's, mBART's and OPT's fc2 and
  final_layer_norm), the model's config does; other architectures are refused (see `modules.FFN_RESIDUALS`).
- `"houlsby-ffn"`: Houlsby's adapter after the feed-forward block only, `LN(h + A(h) + r)`.

With W_up = 0 the adapted model starts identical to the frozen one. The sites are found by module name
(see `modules.DEFAULT_ADAPTER_SITES`), or given as regular expressions or lists of module names (see
`modules.matcher`) of the blocks' output layers; where a placement reads is found from those names
(`modules.residual_dropout`, `modules.ffn_residual`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import modules
from ..errors import TuningError
from .base import InitContext, Method, SiteComponent, expect_shapes, site_key
from .slots import RowParams

if TYPE_CHECKING:
    from ..data import Task

PLACEMENTS = ("houlsby", "pfeiffer", "houlsby-ffn")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "swish": nn.SiLU}
ACTIVATION_FUNCTIONS = {name: cls() for name, cls in ACTIVATIONS.items()}  # stateless: one of each serves every site


@dataclass(frozen=True)
class Adapter(Method):
    """Bottleneck adapters of width `size`: Houlsby's after attention and feed-forward (`"houlsby"`), Pfeiffer's
    after the feed-forward block's add-and-LayerNorm (`"pfeiffer"`), or Houlsby's after feed-forward only
    (`"houlsby-ffn"`)."""

    kind = "adapter"
    default_lr = 1e-3
    compare_lr = 2e-3
    label = "adapters (Houlsby)"
    size: int = 64
    placement: str = "houlsby"
    activation: str = "relu"
    attention_output: str | tuple[str, ...] | None = None  # the attention blocks' output layers
    ffn_output: str | tuple[str, ...] | None = None  # the feed-forward blocks' output layers

    def __post_init__(self):
        if self.size < 1:
            raise TuningError(f"Adapter size must be at least 1, got {self.size}")
        if self.placement not in PLACEMENTS:
            raise TuningError(f"Adapter placement must be one of {', '.join(map(repr, PLACEMENTS))}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise TuningError(f"Adapter activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        for field in ("attention_output", "ffn_output"):
            object.__setattr__(self, field, modules.check_patterns(getattr(self, field), f"Adapter {field}"))

    @classmethod
    def cli_options(cls, options: Any) -> None:
        options.add_argument("--size", type=int, default=64, help="bottleneck width")
        options.add_argument("--placement", default="houlsby", choices=list(PLACEMENTS))
        options.add_argument("--activation", default="relu", help="|".join(ACTIVATIONS))

    @classmethod
    def from_cli(cls, args: argparse.Namespace, task: Task | None) -> Adapter:
        return cls(size=args.size, placement=args.placement, activation=args.activation)

    def resolve(self, model: nn.Module) -> Adapter:
        """This Adapter with its sites as the full names of the layers they select (the default sites if
        None); the attention_output of an adapter after feed-forward only, which it does not use, becomes None."""
        found = adapter_layers(model, self)
        names = {field: modules.explicit_names(model, [n for n, _ in layers], f"Adapter {field}")
                 for field, layers in found.items()}
        return dataclasses.replace(self, ffn_output=names["ffn_output"], attention_output=names.get("attention_output"))


def adapter_layers(model: nn.Module, method: Adapter) -> dict[str, list[tuple[str, nn.Module]]]:
    """The layers an adapter follows, by the field that selects them: ffn_output, and attention_output
    for houlsby; a field that is None takes the model's default sites."""
    wanted = {"ffn_output": (method.ffn_output, 1)}
    if method.placement == "houlsby":
        wanted["attention_output"] = (method.attention_output, 0)
    default: tuple = ()
    out = {}
    for field, (patterns, index) in wanted.items():
        if patterns is None:
            default = default or modules.first_matching(
                model, modules.DEFAULT_ADAPTER_SITES,
                lambda m, pair: modules.find_linears(m, pair[0]) and modules.find_linears(m, pair[1]),
            )
            if not default:
                raise TuningError(
                    f"Adapter does not know where the attention and feed-forward blocks of "
                    f"{type(model).__name__} end; pass attention_output= and ffn_output= as regular "
                    f"expressions or module names of its linear layers ({modules.describe_linears(model)})"
                )
            patterns = default[index]
        what = f"Adapter {field}"
        out[field] = modules.require(modules.find_linears(model, patterns, what), what, model, patterns)
    return out


@dataclass(frozen=True)
class Site:
    """Where one adapter sits: its `width`, the module whose output it reads (`reads`), and whether that
    module is a post-LN layer's LayerNorm, rerun on its input plus the adapter's output (`renorm`)."""

    width: int
    reads: str
    renorm: bool = False


def adapter_sites(model: nn.Module, method: Adapter) -> dict[str, Site]:
    """{site name: Site} of the adapters `method` puts on `model`, in the model's order. A Houlsby adapter's
    site is named by the linear layer it follows; a Pfeiffer adapter's by the module it reads (the LayerNorm
    or the layer whose output is the residual sum)."""
    found = {name: m for layers in adapter_layers(model, method).values() for name, m in layers}
    out = {}
    for name, module in model.named_modules():
        if name not in found:
            continue
        width = modules.linear_features(module)[1]
        if method.placement != "pfeiffer":
            out[name] = Site(width, modules.residual_dropout(model, name))
            continue
        where = modules.ffn_residual(model, name)
        if where is None:
            raise TuningError(
                f"Adapter placement 'pfeiffer' does not know where the feed-forward output {name!r} of "
                f"{type(model).__name__} joins the residual stream (and its LayerNorm); use placement 'houlsby-ffn' "
                "(the adapter on that layer's output)"
            )
        out[where[0]] = Site(width, where[0], renorm=where[1])
    return out


class Bottleneck(nn.Module):
    def __init__(self, width: int, size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(width, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h.to(self.down.weight.dtype))))


class AdapterTuning(nn.Module):
    def __init__(self, method: Adapter, sites: dict[str, Site]):
        super().__init__()
        self.names = list(sites)
        self.sites = sites
        self.blocks = nn.ModuleDict({site_key(n): Bottleneck(s.width, method.size, method.activation)
                                     for n, s in sites.items()})

    def delta(self, name: str, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[site_key(name)](h)


class AdapterComponent(SiteComponent):
    """The adapters of many users. A site's hook is on the module its adapter reads (`Site.reads`), and hands
    the shared site hook that module's output as the source (hence `from_input`): added to it, or, on a
    post-LN LayerNorm, added to its input and normalised again."""

    kind = "adapter"
    from_input = True

    def install(self, tuning: AdapterTuning) -> None:
        found = dict(self.model.named_modules())
        for name, site in tuning.sites.items():
            if name not in self.hooked:
                self._handles.append(found[site.reads].register_forward_hook(self._reading_hook(name, site.renorm)))
                self.hooked.add(name)

    def _reading_hook(self, name: str, renorm: bool):
        change = self._forward_hook(name)
        if not renorm:
            return lambda module, args, output: change(module, (output,), output)

        def hook(module, args, output):
            # the adapter's output alone: the shared hook adds it to zeros, so every row not of an adapter gets 0
            value = change(module, (output,), torch.zeros_like(output))
            return None if value is None else module.forward(args[0] + value)

        return hook

    def site_value(self, user: str, name: str, h: torch.Tensor) -> torch.Tensor:
        return self.tuning(user).delta(name, h)

    nulls = (0.0, 0.0, 0.0, 0.0)

    def slot_group(self, user: str) -> tuple:
        method = self.methods[user]
        return method.size, method.activation

    def site_tensors(self, user: str, name: str) -> tuple[nn.Parameter, ...]:
        block = self.tuning(user).blocks[site_key(name)]
        return block.down.weight, block.down.bias, block.up.weight, block.up.bias  # [r, d], [r], [d, r], [d]

    def stacked_apply(self, name: str, group: tuple, params: RowParams, h: torch.Tensor) -> torch.Tensor:
        act = ACTIVATION_FUNCTIONS[group[1]]  # the group's (`slot_group`: size, activation)
        shape = (h.shape[0], *[1] * (h.dim() - 2), -1)  # a row's vector, to add to each of its positions
        mid = act(params.matmul(h, 0) + params.vector(1).view(shape))
        return params.matmul(mid, 2) + params.vector(3).view(shape)

    def build(self, method: Adapter, context: InitContext) -> nn.Module:
        tuning = AdapterTuning(method, adapter_sites(self.model, method))
        for block in tuning.blocks.values():
            nn.init.kaiming_uniform_(block.down.weight, a=math.sqrt(5))
            nn.init.zeros_(block.down.bias)
            nn.init.zeros_(block.up.weight)
            nn.init.zeros_(block.up.bias)
        return tuning

    def from_state(self, method: Adapter, state: dict[str, torch.Tensor]) -> nn.Module:
        sites = adapter_sites(self.model, method)
        expected = {}
        for name, site in sites.items():
            width = site.width
            expected.update({
                f"{name}.adapter.down.weight": (method.size, width), f"{name}.adapter.down.bias": (method.size,),
                f"{name}.adapter.up.weight": (width, method.size), f"{name}.adapter.up.bias": (width,),
            })
        before = dataclasses.replace(method, placement="houlsby-ffn")  # what "pfeiffer" meant before
        if method.placement == "pfeiffer" and set(state) - set(expected) and all(
                f"{n}.adapter.up.bias" in state for n in adapter_sites(self.model, before)):
            raise TuningError(
                "this adapter was saved when placement 'pfeiffer' meant Houlsby's adapter after the feed-forward block, "
                "which is now placement 'houlsby-ffn': add it as bank.add(user, (dataclasses.replace(method, "
                "placement='houlsby-ffn'), state)) with `method, state = slimtune.bank.read_tuning(folder, model)`"
            )
        expect_shapes(state, expected, "Adapter")
        tuning = AdapterTuning(method, sites)
        tuning.blocks.load_state_dict(
            {f"{site_key(n)}.{rest}": state[f"{n}.adapter.{rest}"] for n in sites
             for rest in ("down.weight", "down.bias", "up.weight", "up.bias")}
        )
        return tuning

    def state(self, user: str) -> dict[str, torch.Tensor]:
        tuning = self.tuning(user)
        return {
            f"{name}.adapter.{rest}": tensor.detach()
            for name in tuning.names
            for rest, tensor in tuning.blocks[site_key(name)].state_dict().items()
        }


Adapter.component = AdapterComponent
