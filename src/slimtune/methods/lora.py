"""LoRA (Hu et al., 2021): a trainable low-rank update beside chosen frozen linear layers.

    h = W x + (alpha / r) * B A x,     A: r x d_in,  B: d_out x r,  B = 0 at the start

so the tuned model starts identical to the frozen one. Per row: each user's (A, B) applies to
that user's rows only. `merge()` folds (alpha / r) B A into W for zero-overhead inference when a
single tuning serves the model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import modules
from ..errors import TuningError
from .base import InitContext, Method, SiteComponent, expect_shapes, site_key


@dataclass(frozen=True)
class LoRA(Method):
    """LoRA of rank `rank` on the linear layers named by `targets` (default: query and value): a regular
    expression for the whole module name, or module names or name suffixes (see `modules.matcher`)."""

    kind = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise TuningError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise TuningError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", modules.check_patterns(self.targets, "LoRA targets"))

    def resolve(self, model: nn.Module) -> LoRA:
        """This LoRA with `targets` (the default ones if None) as the full names of the layers they select."""
        names = modules.explicit_names(model, list(lora_sites(model, self)), "LoRA targets")
        return dataclasses.replace(self, targets=names)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_sites(model: nn.Module, method: LoRA) -> dict[str, tuple[int, int]]:
    """{full name: (in_features, out_features)} of the layers `method` puts LoRA on, in the model's order."""
    targets = method.targets
    if targets is None:
        targets = modules.first_matching(model, modules.DEFAULT_LORA_TARGETS, modules.find_linears)
        if not targets:
            raise TuningError(
                f"LoRA has no default targets for {type(model).__name__}; pass targets=[...] "
                f"naming some of its linear layers: {modules.describe_linears(model)}"
            )
    found = modules.require(modules.find_linears(model, targets, "LoRA targets"), "LoRA target", model, targets)
    return {name: modules.linear_features(m) for name, m in found}


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


class LoRAComponent(SiteComponent):
    kind = "lora"

    from_input = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.merged: str | None = None

    def site_value(self, user: str, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.tuning(user).delta(name, x)

    def skips(self, user: str) -> bool:
        return user == self.merged  # its update is already inside the weights

    def stackable(self, users: list[str]) -> bool:
        first = self.methods[users[0]]
        return all((self.methods[u].rank, self.methods[u].dropout) == (first.rank, first.dropout) for u in users)

    def stack(self, name: str, users: list[str]) -> tuple[torch.Tensor, ...]:
        key = site_key(name)
        tunings = [self.tuning(u) for u in users]
        a = torch.stack([t.A[key] for t in tunings])  # [n, r, d_in]
        b = torch.stack([t.B[key] for t in tunings])  # [n, d_out, r]
        scale = torch.tensor([t.scale for t in tunings], dtype=a.dtype, device=a.device)
        return a, b * scale[:, None, None]  # the scale folded into B: one multiply fewer per call

    def stacked_apply(self, name: str, users: list[str], params: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        a, b = params
        h = self.tuning(users[0]).dropout(x).to(a.dtype).reshape(x.shape[0], -1, x.shape[-1])
        out = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))
        return out.reshape(*x.shape[:-1], b.shape[1])

    def build(self, method: LoRA, context: InitContext) -> nn.Module:
        tuning = LoRATuning(method, lora_sites(self.model, method))
        for a in tuning.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear; B stays zero
        self.hook_sites(tuning.names)
        return tuning

    def from_state(self, method: LoRA, state: dict[str, torch.Tensor]) -> nn.Module:
        sites = lora_sites(self.model, method)
        expected = {}
        for name, (i, o) in sites.items():
            expected[f"{name}.lora_A"] = (method.rank, i)
            expected[f"{name}.lora_B"] = (o, method.rank)
        expect_shapes(state, expected, "LoRA")
        tuning = LoRATuning(method, sites)
        with torch.no_grad():
            for name in sites:
                tuning.A[site_key(name)].copy_(state[f"{name}.lora_A"])
                tuning.B[site_key(name)].copy_(state[f"{name}.lora_B"])
        self.hook_sites(tuning.names)
        return tuning

    def state(self, user: str) -> dict[str, torch.Tensor]:
        tuning = self.tuning(user)
        out = {}
        for name in tuning.names:
            out[f"{name}.lora_A"] = tuning.A[site_key(name)].detach()
            out[f"{name}.lora_B"] = tuning.B[site_key(name)].detach()
        return out

    # --- merging -----------------------------------------------------------------------------

    def _update(self, user: str, sign: float) -> None:
        tuning = self.tuning(user)
        found = dict(self.model.named_modules())
        with torch.no_grad():
            for name in tuning.names:
                key = site_key(name)
                delta = (tuning.B[key] @ tuning.A[key]) * tuning.scale * sign  # d_out x d_in
                weight = found[name].weight
                weight += (delta if isinstance(found[name], nn.Linear) else delta.T).to(weight.dtype)

    def merge(self, user: str) -> None:
        if self.merged is not None:
            raise TuningError(f"LoRA of {self.merged!r} is already merged; unmerge() it first")
        self._update(user, 1.0)
        self.merged = user

    def unmerge(self) -> None:
        if self.merged is None:
            raise TuningError("no LoRA is merged")
        self._update(self.merged, -1.0)
        self.merged = None


LoRA.component = LoRAComponent
