"""What every method shares: a small config object, and a component that holds many users' tunings.

A `Method` is the configuration a user writes (`LoRA(rank=8)`). A `Component` is that method
installed on one shared frozen model: it owns the hooks on the model and a bank of tunings, one
per user, and applies each user's tuning to that user's rows of the batch only. Training one
tuning is the bank-of-one case of the same code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ModelMismatchError, TuningError
from ..routing import Routing, active, route


@dataclass(frozen=True)
class Method:
    """Base of the method configs. `kind` names the method in saved tunings."""

    kind: ClassVar[str] = ""
    component: ClassVar[type[Component]]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass
class InitContext:
    """What a new tuning may need to initialise itself: a tokenizer, and a way to run the frozen model."""

    tokenizer: Any = None
    run_base: Any = None  # callable(input_ids) running the frozen model, for text-based inits

    def encode(self, text: str, what: str) -> list[int]:
        if self.tokenizer is None:
            raise TuningError(f"{what} needs a tokenizer: pass tokenizer= to attach() or Bank.add()")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TuningError(f"{what}: the text {text!r} encodes to no tokens")
        return list(ids)


def slot_key(user: str) -> str:
    """A module-safe key for a user name (ModuleDict keys cannot contain dots)."""
    return "u_" + user.encode().hex()


def site_key(name: str) -> str:
    return name.replace(".", "__")


class Component(nn.Module):
    """One method installed on one model, holding the tunings of many users."""

    kind: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: the base is not ours
        self.users = nn.ModuleDict()
        self.methods: dict[str, Method] = {}
        self._handles: list = []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- users -------------------------------------------------------------------------------

    def add(self, user: str, method: Method, state: dict[str, torch.Tensor] | None, context: InitContext) -> None:
        tuning = self.build(method, context) if state is None else self.from_state(method, state)
        self.users[slot_key(user)] = tuning.to(device=self.device, dtype=self.dtype)
        self.methods[user] = method

    def remove(self, user: str) -> None:
        del self.users[slot_key(user)]
        del self.methods[user]

    def tuning(self, user: str) -> nn.Module:
        return self.users[slot_key(user)]

    def user_parameters(self, user: str) -> Iterator[nn.Parameter]:
        return self.tuning(user).parameters()

    def state(self, user: str) -> dict[str, torch.Tensor]:
        """The user's tuning in its saved form: {dotted name: tensor}."""
        raise NotImplementedError

    def build(self, method: Method, context: InitContext) -> nn.Module:
        """A freshly initialised tuning for `method`."""
        raise NotImplementedError

    def from_state(self, method: Method, state: dict[str, torch.Tensor]) -> nn.Module:
        """A tuning holding `state` (as produced by `state()`), shapes checked against this model."""
        raise NotImplementedError

    def prepare(self, routing: Routing) -> None:
        """Called once per batch before the model runs (e.g. compute a reparameterised prefix once)."""

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def expect_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Check a loaded tuning against the shapes this model needs, naming the first difference."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelMismatchError(
            f"{what}: the tuning's tensors do not fit this model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); "
            "was it trained on another architecture?"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ModelMismatchError(
                f"{what}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"this model needs {tuple(shape)}; was it trained on a model of another size?"
            )


class SiteComponent(Component):
    """A component that changes the outputs of named modules ("sites") through forward hooks.

    Each user's tuning lists its `names`; `site_value` gives the user's change at one site for
    their rows, computed from the module's input (`from_input`) or its output, and added to the
    output (or replacing it, `replace`).
    """

    from_input: ClassVar[bool] = False
    replace: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.hooked: set[str] = set()

    def site_value(self, user: str, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def skips(self, user: str) -> bool:
        return False

    def stackable(self, users: list[str]) -> bool:
        """Whether these users' tunings have the same shapes, so `stacked_value` can run them together."""
        return False

    def stacked_value(self, name: str, users: list[str], which: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`site_value` for many users at once: row i of x belongs to users[which[i]]."""
        raise NotImplementedError

    def hook_sites(self, names: list[str]) -> None:
        found = dict(self.model.named_modules())
        for name in names:
            if name not in self.hooked:
                self._handles.append(found[name].register_forward_hook(self._forward_hook(name)))
                self.hooked.add(name)

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            routing = active()
            if routing is None:
                return None
            everyone = routing.groups(self, output.shape[0])
            groups = [(user, rows) for user, rows in everyone if name in self.tuning(user).names and not self.skips(user)]
            if not groups:
                return None
            source = args[0] if self.from_input else output
            if 1 < len(groups) == len(everyone) and self.stackable([user for user, _ in groups]):
                return self._stacked(name, routing, source, output)
            return route(source, output, groups, lambda user, x: self.site_value(user, name, x), self.replace)

        return hook

    def _stacked(self, name: str, routing: Routing, source: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Every user's rows in one gathered, batched computation instead of a loop over users."""
        users, rows, which = routing.stacked(self, output.shape[0])
        value = self.stacked_value(name, users, which, source.index_select(0, rows)).to(output.dtype)
        return output.index_copy(0, rows, value) if self.replace else output.index_add(0, rows, value)

    def close(self) -> None:
        super().close()
        self.hooked.clear()
