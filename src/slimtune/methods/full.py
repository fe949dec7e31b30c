"""Model tuning: full fine-tuning of every weight, the baseline the lightweight methods are measured against.

It goes through the same `attach` / `save` / `load` API, but it changes the shared weights
themselves, so it trains the given model in place and cannot share a bank with other tunings.
A saved full fine-tune holds the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelMismatchError
from .base import Component, InitContext, Method


@dataclass(frozen=True)
class FullFineTuning(Method):
    """Train every weight of the model (in place)."""

    kind = "full"
    writes_base = True
    # Every weight is already well placed: small rates.
    default_lr = 3e-5
    compare_lr = 5e-5
    label = "model tuning"


class FullComponent(Component):
    kind = "full"

    def build(self, method: FullFineTuning, context: InitContext) -> nn.Module:
        self.model.requires_grad_(True)
        return nn.Module()

    def from_state(self, method: FullFineTuning, state: dict[str, torch.Tensor]) -> nn.Module:
        # Everything is checked before the first weight is written: a refused state leaves the model as it was.
        own = self.model.state_dict()
        tied = self._aliases()
        missing = [n for n in own if n not in state and n not in tied]
        unexpected = [n for n in state if n not in own]
        if missing or unexpected:
            raise ModelMismatchError(
                f"full fine-tune does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ModelMismatchError(
                    f"full fine-tune: weight {name!r} has shape {tuple(tensor.shape)}, this model needs {tuple(own[name].shape)}"
                )
        self.model.load_state_dict(state, strict=False)
        return self.build(method, InitContext())

    def _aliases(self) -> set[str]:
        """Names of tensors that share storage with an earlier one (tied embeddings)."""
        seen, aliases = set(), set()
        for name, tensor in self.model.state_dict().items():
            if tensor.data_ptr() in seen:
                aliases.add(name)
            seen.add(tensor.data_ptr())
        return aliases

    def state(self, user: str) -> dict[str, torch.Tensor]:
        aliases = self._aliases()
        return {n: t.detach() for n, t in self.model.state_dict().items() if n not in aliases}

    def user_parameters(self, user: str) -> Iterator[nn.Parameter]:
        return self.model.parameters()


FullFineTuning.component = FullComponent
