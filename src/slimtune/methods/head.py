"""The task head that `AutoModelForSequenceClassification` (and similar) put on a pretrained body.

Such a head is new and random, so it must train along with any tuning and be saved with it.
Each user gets their own copy of the head's linear layers; on that user's rows the copy's output
replaces the shared head's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .. import modules
from .base import Method, SiteComponent, expect_shapes, site_key


class HeadTuning(nn.Module):
    def __init__(self, linears: dict[str, nn.Module]):
        super().__init__()
        self.names = list(linears)
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        for name, module in linears.items():
            weight = module.weight.detach().clone()
            self.weight[site_key(name)] = nn.Parameter(weight if isinstance(module, nn.Linear) else weight.T.contiguous())
            if module.bias is not None:
                self.bias[site_key(name)] = nn.Parameter(module.bias.detach().clone())

    def forward_site(self, name: str, x: torch.Tensor) -> torch.Tensor:
        key = site_key(name)
        return F.linear(x, self.weight[key], self.bias[key] if key in self.bias else None)


class HeadComponent(SiteComponent):
    kind = "head"
    from_input = True
    replace = True

    def linears(self) -> dict[str, nn.Module]:
        heads = modules.head_names(self.model)
        return {n: m for n, m in self.model.named_modules() if modules.in_head(n, heads) and modules.is_linear(m)}

    def site_value(self, user: str, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.tuning(user).forward_site(name, x)

    def build(self, method: Method | None, context) -> nn.Module:
        tuning = HeadTuning(self.linears())
        return tuning

    def from_state(self, method: Method | None, state: dict[str, torch.Tensor]) -> nn.Module:
        tuning = HeadTuning(self.linears())
        expected = {f"{n}.weight": tuple(tuning.weight[site_key(n)].shape) for n in tuning.names}
        expected.update({f"{n}.bias": tuple(tuning.bias[site_key(n)].shape) for n in tuning.names if site_key(n) in tuning.bias})
        expect_shapes(state, expected, "task head")
        with torch.no_grad():
            for name in tuning.names:
                tuning.weight[site_key(name)].copy_(state[f"{name}.weight"])
                if site_key(name) in tuning.bias:
                    tuning.bias[site_key(name)].copy_(state[f"{name}.bias"])
        return tuning

    def state(self, user: str) -> dict[str, torch.Tensor]:
        tuning = self.tuning(user)
        out = {}
        for name in tuning.names:
            out[f"{name}.weight"] = tuning.weight[site_key(name)].detach()
            if site_key(name) in tuning.bias:
                out[f"{name}.bias"] = tuning.bias[site_key(name)].detach()
        return out
