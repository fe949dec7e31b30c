"""Adapter tuning (Houlsby et al., 2019): a bottleneck module inside every frozen layer.

    Adapter(h) = h + W_up · σ(W_down · h),     W_down: d -> r,  W_up: r -> d,  W_up = 0 at the start

applied to the output of the attention block and of the feed-forward block (`"houlsby"`), or of
the feed-forward block only (`"pfeiffer"`), before the residual connection and layer norm. With
W_up = 0 the adapted model starts identical to the frozen one. The sites are found by module
name (see `modules.DEFAULT_ADAPTER_SITES`), or given as regular expressions or lists of module
names (see `modules.matcher`).
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

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "swish": nn.SiLU}


@dataclass(frozen=True)
class Adapter(Method):
    """Bottleneck adapters of width `size` after attention and feed-forward (houlsby) or feed-forward only (pfeiffer)."""

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
        if self.placement not in ("houlsby", "pfeiffer"):
            raise TuningError(f"Adapter placement must be 'houlsby' or 'pfeiffer', got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise TuningError(f"Adapter activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        for field in ("attention_output", "ffn_output"):
            object.__setattr__(self, field, modules.check_patterns(getattr(self, field), f"Adapter {field}"))

    @classmethod
    def cli_options(cls, options: Any) -> None:
        options.add_argument("--size", type=int, default=64, help="bottleneck width")
        options.add_argument("--placement", default="houlsby", choices=["houlsby", "pfeiffer"])
        options.add_argument("--activation", default="relu", help="|".join(ACTIVATIONS))

    @classmethod
    def from_cli(cls, args: argparse.Namespace, task: Task | None) -> Adapter:
        return cls(size=args.size, placement=args.placement, activation=args.activation)

    def resolve(self, model: nn.Module) -> Adapter:
        """This Adapter with its sites as the full names of the layers they select (the default sites if
        None); a pfeiffer adapter's attention_output, which it does not use, becomes None."""
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


def adapter_sites(model: nn.Module, method: Adapter) -> dict[str, int]:
    """{full name: width} of the layers `method` puts an adapter after, in the model's order."""
    found = {name: m for layers in adapter_layers(model, method).values() for name, m in layers}
    return {name: modules.linear_features(m)[1] for name, m in model.named_modules() if name in found}


class Bottleneck(nn.Module):
    def __init__(self, width: int, size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(width, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h.to(self.down.weight.dtype))))


class AdapterTuning(nn.Module):
    def __init__(self, method: Adapter, sites: dict[str, int]):
        super().__init__()
        self.names = list(sites)
        self.blocks = nn.ModuleDict({site_key(n): Bottleneck(w, method.size, method.activation) for n, w in sites.items()})

    def delta(self, name: str, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[site_key(name)](h)


class AdapterComponent(SiteComponent):
    kind = "adapter"

    def site_value(self, user: str, name: str, h: torch.Tensor) -> torch.Tensor:
        return self.tuning(user).delta(name, h)

    nulls = (0.0, 0.0, 0.0, 0.0)

    def slot_group(self, user: str) -> tuple:
        method = self.methods[user]
        return method.size, method.activation

    def site_tensors(self, user: str, name: str) -> tuple[nn.Parameter, ...]:
        block = self.tuning(user).blocks[site_key(name)]
        return block.down.weight, block.down.bias, block.up.weight, block.up.bias  # [r, d], [r], [d, r], [d]

    def stacked_apply(self, name: str, users: list[str], params: RowParams, h: torch.Tensor) -> torch.Tensor:
        act = self.tuning(users[0]).blocks[site_key(name)].act
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
        for name, width in sites.items():
            expected.update({
                f"{name}.adapter.down.weight": (method.size, width), f"{name}.adapter.down.bias": (method.size,),
                f"{name}.adapter.up.weight": (width, method.size), f"{name}.adapter.up.bias": (width,),
            })
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
