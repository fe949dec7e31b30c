"""LoRA (Hu et al., 2021): a trainable low-rank update beside chosen frozen linear layers.

    h = W x + (alpha / r) * B A x,     A: r x d_in,  B: d_out x r,  B = 0 at the start

so the tuned model starts identical to the frozen one. Per row: each user's (A, B) applies to
that user's rows only. `merge()` folds (alpha / r) B A into W for zero-overhead inference when a
single tuning serves the model.

rsLoRA (Kalajdzievski, 2023), `rslora=True`, scales by alpha / sqrt(r) instead, so that the update's
size does not shrink as the rank grows. DoRA (dora.py) builds on this file's LoRA.
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


@dataclass(frozen=True)
class LoRA(Method):
    """LoRA of rank `rank` on the linear layers named by `targets` (default: query and value): a regular
    expression for the whole module name, or module names or name suffixes (see `modules.matcher`).
    `rslora=True`: scaled by alpha / sqrt(rank) (rank-stabilised LoRA) instead of alpha / rank."""

    kind = "lora"
    default_lr = 1e-3
    compare_lr = 2e-3
    label = "LoRA"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str | None = None
    rslora: bool = False

    def __post_init__(self):
        name = type(self).__name__
        if self.rank < 1:
            raise TuningError(f"{name} rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise TuningError(f"{name} dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", modules.check_patterns(self.targets, f"{name} targets"))

    @classmethod
    def cli_options(cls, options: Any) -> None:
        options.add_argument("--rank", type=int, default=8, help="rank of the update (default 8)")
        options.add_argument("--alpha", type=float, default=16.0, help="the update is scaled by alpha / rank (default 16)")
        options.add_argument("--dropout", type=float, default=0.0, help="dropout on the update's input")
        options.add_argument("--targets", help="comma-separated module names or suffixes (default: query and value)")
        options.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank) (rank-stabilised)")

    @classmethod
    def from_cli(cls, args: argparse.Namespace, task: Task | None) -> LoRA:
        targets = tuple(args.targets.split(",")) if args.targets else None
        return cls(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets, rslora=args.rslora)

    def resolve(self, model: nn.Module) -> LoRA:
        """This LoRA with `targets` (the default ones if None) as the full names of the layers they select."""
        names = modules.explicit_names(model, list(lora_sites(model, self)), f"{type(self).__name__} targets")
        return dataclasses.replace(self, targets=names)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def lora_sites(model: nn.Module, method: LoRA) -> dict[str, tuple[int, int]]:
    """{full name: (in_features, out_features)} of the layers `method` puts LoRA on, in the model's order."""
    targets, what = method.targets, type(method).__name__
    if targets is None:
        targets = modules.first_matching(model, modules.DEFAULT_LORA_TARGETS, modules.find_linears)
        if not targets:
            raise TuningError(
                f"{what} has no default targets for {type(model).__name__}; pass targets=[...] "
                f"naming some of its linear layers: {modules.describe_linears(model)}"
            )
    found = modules.require(modules.find_linears(model, targets, f"{what} targets"), f"{what} target", model, targets)
    return {name: modules.linear_features(m) for name, m in found}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as [out, in] (a view: GPT-2's Conv1D stores it as [in, out])."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


class LoRATuning(nn.Module):
    def __init__(self, method: LoRA, sites: dict[str, tuple[int, int]]):
        super().__init__()
        self.names = list(sites)
        self.scale = method.scale
        self.dropout = nn.Dropout(method.dropout)
        self.A = nn.ParameterDict({site_key(n): nn.Parameter(torch.zeros(method.rank, i)) for n, (i, o) in sites.items()})
        self.B = nn.ParameterDict({site_key(n): nn.Parameter(torch.zeros(o, method.rank)) for n, (i, o) in sites.items()})

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        key = site_key(name)
        a, b = self.A[key], self.B[key]
        return (self.dropout(x).to(a.dtype) @ a.T @ b.T) * self.scale

    def update(self, name: str) -> torch.Tensor:
        """(alpha / r) B A at one layer, [d_out, d_in]: what merging adds to its weight."""
        key = site_key(name)
        return (self.B[key] @ self.A[key]) * self.scale

    def saved(self) -> dict[str, nn.Parameter]:
        """The parameters by their names in the saved form: `<layer>.lora_A` [r, d_in], `<layer>.lora_B` [d_out, r]."""
        out = {}
        for name in self.names:
            out[f"{name}.lora_A"] = self.A[site_key(name)]
            out[f"{name}.lora_B"] = self.B[site_key(name)]
        return out


class LoRAComponent(SiteComponent):
    kind = "lora"

    from_input = True
    merges = True

    def site_value(self, user: str, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.tuning(user).delta(name, x)

    nulls = (0.0, 0.0)

    def slot_group(self, user: str) -> tuple:
        method = self.methods[user]
        return method.rank, method.dropout

    def slot_numbers(self, user: str) -> tuple[float, ...]:
        return (self.tuning(user).scale,)

    def site_tensors(self, user: str, name: str) -> tuple[nn.Parameter, ...]:
        tuning, key = self.tuning(user), site_key(name)
        return tuning.A[key], tuning.B[key]  # [r, d_in], [d_out, r]

    def stacked_apply(self, name: str, group: tuple, params: RowParams, x: torch.Tensor) -> torch.Tensor:
        (scale,) = params.numbers
        _, dropout = group  # (`slot_group`: rank, dropout)
        x = nn.functional.dropout(x, dropout, self.training) if dropout else x
        down = params.matmul(x, 0)  # [rows, ..., r]: the smallest place
        return params.matmul(down * scale.view(-1, *[1] * (x.dim() - 1)), 1)  # for the scale

    def new_tuning(self, method: LoRA, sites: dict[str, tuple[int, int]]) -> LoRATuning:
        return LoRATuning(method, sites)

    def build(self, method: LoRA, context: InitContext) -> nn.Module:
        tuning = self.new_tuning(method, lora_sites(self.model, method))
        for a in tuning.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear; B stays zero
        return tuning

    def from_state(self, method: LoRA, state: dict[str, torch.Tensor]) -> nn.Module:
        tuning = self.new_tuning(method, lora_sites(self.model, method))
        saved = tuning.saved()
        expect_shapes(state, {name: tuple(p.shape) for name, p in saved.items()}, type(method).__name__)
        with torch.no_grad():
            for name, parameter in saved.items():
                parameter.copy_(state[name])
        return tuning

    def state(self, user: str) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.tuning(user).saved().items()}

    # --- merging -----------------------------------------------------------------------------

    def fold(self, user: str, undo: bool) -> None:
        tuning = self.tuning(user)
        found = dict(self.model.named_modules())
        with torch.no_grad():
            for name in tuning.names:
                weight = weight_matrix(found[name])
                weight += (tuning.update(name) * (-1.0 if undo else 1.0)).to(weight.dtype)


LoRA.component = LoRAComponent
