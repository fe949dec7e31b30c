"""DoRA (Liu et al., 2024): weight-decomposed LoRA, a learned magnitude per output times a LoRA-updated direction.

    W' = m · (W + s·B·A) / ‖W + s·B·A‖,     h = W' x + b,     m = ‖W‖ at the start

where ‖·‖ is the norm of each output feature's row (over the inputs), so m and the norm are
[d_out] vectors, and s is LoRA's scale (alpha / r, or alpha / sqrt(r) with `rslora=True`). With
B = 0 and m = ‖W‖, W' = W: the tuned model starts identical to the frozen one. As the paper
suggests (section 4.3) and PEFT does, the norm is treated as a constant in backpropagation.

Per row, with g = m / ‖W + s·B·A‖, the layer's own output W x + b becomes

    g · (W x + s·B·A x) + b  =  (W x + b + s·B·A x) + (g - 1) · (W x + s·B·A x)

so DoRA is LoRA's update (added by LoRA's hooks, stacked across users of one rank) followed by a
per-row rescaling of the output without its bias, 1 on every row that is not a DoRA user's.
Dropout applies to LoRA's input only (PEFT, in training with dropout, also rescales W · dropout(x);
evaluation is the same in both). `merge()` writes g · (W + s·B·A) into W.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TuningError
from ..routing import Routing, active
from .base import InitContext, site_key
from .lora import LoRA, LoRAComponent, LoRATuning, weight_matrix


@dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA of rank `rank` on the layers named by `targets`: every LoRA setting, plus a trained magnitude per
    output feature of each layer. Its own method (not a LoRA option) because it trains and stores more than
    LoRA's A and B, computes each row from the layer's output as well as its input, and merges differently."""

    kind = "dora"
    # LoRA's rates (inherited, as are its options): DoRA trains LoRA's A and B, and a magnitude that starts at
    # ‖W‖, as PEFT's `use_dora` does on a LoRA config of the same learning rate.
    label = "DoRA"
    needs_base_weights = "DoRA reads the norm of each frozen weight"


class DoRATuning(LoRATuning):
    def __init__(self, method: DoRA, sites: dict[str, tuple[int, int]]):
        super().__init__(method, sites)
        self.magnitude = nn.ParameterDict({site_key(n): nn.Parameter(torch.ones(o)) for n, (i, o) in sites.items()})

    def gain(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """m / ‖W + s·B·A‖ per output feature of one layer (`weight`: its W as [d_out, d_in]); the norm
        carries no gradient."""
        with torch.no_grad():
            norm = torch.linalg.vector_norm(weight + self.update(name).to(weight.dtype), dim=1)
        return self.magnitude[site_key(name)] / norm.to(self.magnitude[site_key(name)].dtype)

    def saved(self) -> dict[str, nn.Parameter]:
        """LoRA's tensors, and `<layer>.magnitude` [d_out]."""
        return super().saved() | {f"{name}.magnitude": self.magnitude[site_key(name)] for name in self.names}


class DoRAComponent(LoRAComponent):
    kind = "dora"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._modules_by_name: dict[str, nn.Module] = {}
        self._folded: dict[str, torch.Tensor] = {}  # the gains merge() applied, by layer: unmerge() divides by them

    def new_tuning(self, method: DoRA, sites: dict[str, tuple[int, int]]) -> DoRATuning:
        return DoRATuning(method, sites)

    def build(self, method: DoRA, context: InitContext) -> nn.Module:
        tuning = super().build(method, context)
        with torch.no_grad():
            for name in tuning.names:
                tuning.magnitude[site_key(name)].copy_(torch.linalg.vector_norm(self._weight(name), dim=1))
        return tuning

    def _weight(self, name: str) -> torch.Tensor:
        if not self._modules_by_name:
            self._modules_by_name = dict(self.model.named_modules())
        weight = weight_matrix(self._modules_by_name[name])
        if not weight.dtype.is_floating_point:
            raise TuningError(
                f"DoRA needs the weights of {name!r} to compute their norm, but they are stored as {weight.dtype} "
                "(a quantised layer); use LoRA on quantised models"
            )
        return weight

    def _forward_hook(self, name: str):
        add_update = super()._forward_hook(name)  # LoRA's s·B·A x, on the rows of the users that have this layer

        def hook(module, args, output):
            updated = add_update(module, args, output)
            return None if updated is None else self._rescale(name, module, updated)

        return hook

    def _rescale(self, name: str, module: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """out + (g - 1) · (out - b), with each row's own g (1 on rows without a DoRA update at this layer)."""
        routing = active()
        batch = out.shape[0]
        if routing.keep_layout and not torch.is_grad_enabled():
            gain = self._slot_gains(name, routing, batch)
        else:
            users, rows, which = routing.stacked(self, batch)
            key = ("gain", name, tuple(users), routing.owners_key(self, batch))
            gain = self.kept(key, users, lambda: self._row_gains(name, users, rows, which, batch), routing)
        base = out if module.bias is None else out - module.bias
        return out + (gain - 1).view(batch, *[1] * (out.dim() - 2), -1).to(out.dtype) * base

    def _slot_gains(self, name: str, routing: Routing, batch: int) -> torch.Tensor:
        """Each row's gains from each table's gains of every slot (`slot_derived`, computed when the slot was
        written: a serving bank's tunings change only by add and remove): nothing computed or made per step, so a
        compiled step's graph reads them as it reads the slots."""
        gain = None
        for table, rows in self.slot_rows(routing, batch):
            derived = table.derived.get(("gain", name))
            if derived is None:  # none of the table's users has this layer: 1 on its rows
                continue
            part = derived[0].index_select(0, rows.index)
            gain = part if gain is None else gain * part
        return torch.ones(batch, self._weight(name).shape[0], device=self.device, dtype=self.dtype) if gain is None else gain

    def slot_derived(self, user: str) -> dict[Hashable, tuple[torch.Tensor, float]]:
        """Each layer's gain m / ‖W + s·B·A‖ of the user's tuning (1 where the user has no update)."""
        tuning = self.tuning(user)
        return {("gain", name): (tuning.gain(name, self._weight(name)), 1.0) for name in tuning.names}

    def _row_gains(self, name: str, users: list[str], rows: torch.Tensor, which: torch.Tensor, batch: int) -> torch.Tensor:
        weight = self._weight(name)
        ones = torch.ones(weight.shape[0], device=weight.device, dtype=self.dtype)
        gains = torch.stack([
            self.tuning(u).gain(name, weight) if self.has_site(u, name) and not self.skips(u) else ones for u in users
        ])
        return torch.ones(batch, weight.shape[0], device=weight.device, dtype=gains.dtype).index_copy(0, rows, gains[which])

    # --- merging -----------------------------------------------------------------------------

    def fold(self, user: str, undo: bool) -> None:
        tuning = self.tuning(user)
        with torch.no_grad():
            if not undo:
                gains = {name: tuning.gain(name, self._weight(name)) for name in tuning.names}
                if any((g == 0).any() for g in gains.values()):
                    raise TuningError(f"the DoRA tuning of {user!r} has a zero magnitude, so merging it could not be undone")
            for name in tuning.names:
                weight = self._weight(name)
                if undo:
                    weight.copy_(weight / self._folded.pop(name)[:, None].to(weight.dtype) - tuning.update(name).to(weight.dtype))
                else:
                    self._folded[name] = gains[name]
                    weight.copy_((weight + tuning.update(name).to(weight.dtype)) * gains[name][:, None].to(weight.dtype))
        for table in self.tables.values():  # the other tunings' gains are computed from these weights
            table.rederive()


DoRA.component = DoRAComponent
