"""BitFit (Ben Zaken et al., 2022): train only the bias terms.

    h = W x + (b + delta_b)        (and LayerNorm: gamma * norm(x) + (beta + delta_beta))

Each user's tuning is the change delta_b of every bias, starting at zero; adding it to a
module's output is exactly changing that module's bias, so one frozen model serves any number
of BitFit users row by row. Models without biases (Llama) raise an error, unless
`add_missing=True` asks for new zero-initialised biases on every linear layer, which is then
no longer pure BitFit.
"""

from __future__ import annotations

import argparse
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


@dataclass(frozen=True)
class BitFit(Method):
    """Train the bias terms only (`add_missing=True`: also add zero biases to bias-free linears)."""

    kind = "bitfit"
    default_lr = 2e-3
    compare_lr = 1e-2
    label = "BitFit"
    add_missing: bool = False

    @classmethod
    def cli_options(cls, options: Any) -> None:
        options.add_argument("--add-missing", action="store_true", help="add zero biases where a model has none")

    @classmethod
    def from_cli(cls, args: argparse.Namespace, task: Task | None) -> BitFit:
        return cls(add_missing=args.add_missing)

    @classmethod
    def for_study(cls, task: Task, model: nn.Module, family: str, options: dict[str, Any]) -> BitFit:
        """With zero biases added on a model that has none (SmolLM2), as the study could not run it otherwise."""
        has_bias = any(getattr(m, "bias", None) is not None for m in model.modules() if hasattr(m, "weight"))
        return cls(**{"add_missing": not has_bias, **options})


class BitFitTuning(nn.Module):
    def __init__(self, sites: dict[str, int]):
        super().__init__()
        self.names = list(sites)
        self.delta = nn.ParameterDict({site_key(n): nn.Parameter(torch.zeros(size)) for n, size in sites.items()})

    def bias(self, name: str) -> torch.Tensor:
        return self.delta[site_key(name)]


class BitFitComponent(SiteComponent):
    kind = "bitfit"

    def site_value(self, user: str, name: str, out: torch.Tensor) -> torch.Tensor:
        return self.tuning(user).bias(name).expand_as(out)

    nulls = (0.0,)

    def slot_group(self, user: str) -> tuple:
        return ()  # every BitFit tuning of a model has one shape per site

    def site_tensors(self, user: str, name: str) -> tuple[nn.Parameter, ...]:
        return (self.tuning(user).delta[site_key(name)],)  # [d]

    def stacked_apply(self, name: str, group: tuple, params: RowParams, out: torch.Tensor) -> torch.Tensor:
        return params.vector(0).view(out.shape[0], *[1] * (out.dim() - 2), out.shape[-1]).expand_as(out)

    def sites(self, method: BitFit) -> dict[str, int]:
        sites = {}
        for name, module in modules.body_modules(self.model):
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                sites[name] = bias.numel()
            elif method.add_missing and modules.is_linear(module):
                sites[name] = modules.linear_features(module)[1]
        if not sites:
            raise TuningError(
                f"BitFit: {type(self.model).__name__} has no bias terms, so BitFit would train nothing. "
                "Use BitFit(add_missing=True) to add zero-initialised biases to its linear layers, "
                "or another method (LoRA, Adapter)"
            )
        return sites

    def build(self, method: BitFit, context: InitContext) -> nn.Module:
        tuning = BitFitTuning(self.sites(method))
        return tuning

    def from_state(self, method: BitFit, state: dict[str, torch.Tensor]) -> nn.Module:
        sites = self.sites(method)
        expect_shapes(state, {f"{n}.bias": (s,) for n, s in sites.items()}, "BitFit")
        tuning = BitFitTuning(sites)
        with torch.no_grad():
            for name in sites:
                tuning.bias(name).copy_(state[f"{name}.bias"])
        return tuning

    def state(self, user: str) -> dict[str, torch.Tensor]:
        # Saved as the bias change; the tuned bias is the base bias plus this.
        tuning = self.tuning(user)
        return {f"{name}.bias": tuning.bias(name).detach() for name in tuning.names}



BitFit.component = BitFitComponent
