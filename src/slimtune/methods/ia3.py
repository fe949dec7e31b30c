"""IA3 (Liu et al., 2022, "(IA)^3"): learned vectors that rescale the keys, the values and the
feed-forward block's intermediate activation, elementwise.

    k' = l_k ⊙ k,     v' = l_v ⊙ v,     h_ff' = W_out (l_ff ⊙ σ(W_in x)),     l = 1 at the start

so the tuned model starts identical to the frozen one. It is found by module name, as PEFT's IA3
is: each target layer gets a vector; on a *feed-forward* layer it scales the layer's input (the
intermediate activation going into the block's output projection), on any other its output. The
default targets are PEFT's: GPT-2's fused query/key/value output and its feed-forward output layer's
input (`c_attn`, `mlp.c_proj`, the latter feed-forward), Llama's `k_proj`, `v_proj` and `down_proj`
(feed-forward); T5's `k`, `v` and `wo`; BERT's key, value and feed-forward output.

Per row, each user's vectors scale that user's rows only: one [batch, width] scale per layer,
exactly 1 on every other row, multiplied into the layer's input (a forward pre-hook) or output.
`merge()` scales W's rows (and the bias) or columns instead.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import modules
from ..errors import TuningError
from ..routing import active
from .base import InitContext, Method, SiteComponent, expect_shapes, site_key

if TYPE_CHECKING:
    from ..data import Task

# (targets, feedforward targets) of each family, as PEFT's IA3 defaults; the first whose every target is found wins.
DEFAULT_IA3_TARGETS: list[tuple[str | tuple[str, ...], str | tuple[str, ...]]] = [
    (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),  # GPT-2: fused query/key/value, feed-forward output
    (("k_proj", "v_proj", "down_proj"), ("down_proj",)),  # Llama, Mistral, Qwen, Gemma
    (("k", "v", "wo"), ("wo",)),  # T5
    (r".*\.attention\.self\.(key|value)|.*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output\.dense"),  # BERT
]


@dataclass(frozen=True)
class IA3(Method):
    """IA3 on the linear layers named by `targets` (default: keys, values and the feed-forward output layer);
    those among them that `feedforward` names scale their input, the others their output. `feedforward=None`
    takes the model's default feed-forward layers (as PEFT does). Both are patterns as LoRA's `targets`."""

    kind = "ia3"
    # Each vector starts at 1 and scales a whole activation, so a step of Adam (~lr per entry) changes the output
    # by a fraction lr: the rates of PEFT's IA3 examples (3e-3 to 1e-2) and of T-Few (3e-3), BitFit's at 40 steps.
    default_lr = 3e-3
    compare_lr = 1e-2
    label = "IA3"
    targets: tuple[str, ...] | str | None = None
    feedforward: tuple[str, ...] | str | None = None

    def __post_init__(self):
        for field in ("targets", "feedforward"):
            object.__setattr__(self, field, modules.check_patterns(getattr(self, field), f"IA3 {field}"))

    @classmethod
    def cli_options(cls, options: Any) -> None:
        options.add_argument("--targets", help="comma-separated layer names or suffixes (default: keys, values and "
                             "the feed-forward output layer)")
        options.add_argument("--feedforward", help="which of the targets scale their input, comma-separated "
                             "(default: the feed-forward output layers among them)")

    @classmethod
    def from_cli(cls, args: argparse.Namespace, task: Task | None) -> IA3:
        targets = tuple(args.targets.split(",")) if args.targets else None
        feedforward = tuple(args.feedforward.split(",")) if args.feedforward else None
        return cls(targets=targets, feedforward=feedforward)

    def resolve(self, model: nn.Module) -> IA3:
        """This IA3 with both fields as the full names of the layers they select (feedforward: among the targets)."""
        sites = ia3_sites(model, self)
        return dataclasses.replace(
            self,
            targets=modules.explicit_names(model, list(sites), "IA3 targets"),
            feedforward=modules.explicit_names(model, [n for n, (_, ff) in sites.items() if ff], "IA3 feedforward"),
        )


def _found(model: nn.Module, default: tuple) -> bool:
    patterns = default[0]
    if isinstance(patterns, str):
        return bool(modules.find_linears(model, patterns))
    return all(modules.find_linears(model, [p]) for p in patterns)


def ia3_sites(model: nn.Module, method: IA3) -> dict[str, tuple[int, bool]]:
    """{full name: (width of its vector, whether it scales the input)} of the layers `method` tunes, in model order."""
    default = modules.first_matching(model, DEFAULT_IA3_TARGETS, _found)
    targets, feedforward = method.targets, method.feedforward
    if targets is None:
        if not default:
            raise TuningError(
                f"IA3 has no default targets for {type(model).__name__}; pass targets=[...] naming its key, value and "
                f"feed-forward layers, and feedforward=[...] naming the feed-forward ones ({modules.describe_linears(model)})"
            )
        targets = default[0]
    found = modules.require(modules.find_linears(model, targets, "IA3 targets"), "IA3 target", model, targets)
    scaled_input: set[str] = set()
    if feedforward is not None:
        scaled_input = {n for n, _ in modules.find_linears(model, feedforward, "IA3 feedforward")}
        stray = sorted(scaled_input - {n for n, _ in found})
        if stray:
            raise TuningError(
                f"IA3 feedforward selects {stray[0]!r}, which is not one of its targets; feedforward names which "
                "of the targets scale their input"
            )
    elif default:
        scaled_input = {n for n, _ in modules.find_linears(model, default[1])}
    out = {}
    for name, module in found:
        d_in, d_out = modules.linear_features(module)
        out[name] = (d_in, True) if name in scaled_input else (d_out, False)
    return out


class IA3Tuning(nn.Module):
    def __init__(self, sites: dict[str, tuple[int, bool]]):
        super().__init__()
        self.names = list(sites)
        self.scales_input = {n: ff for n, (_, ff) in sites.items()}
        self.scale = nn.ParameterDict({site_key(n): nn.Parameter(torch.ones(w)) for n, (w, _) in sites.items()})

    def vector(self, name: str) -> torch.Tensor:
        return self.scale[site_key(name)]


class IA3Component(SiteComponent):
    kind = "ia3"

    merges = True
    nulls = (1.0,)  # a scale of one changes nothing

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.hooked: dict[str, bool] = {}  # layer -> whether its input (True) or output is scaled

    def slot_group(self, user: str) -> tuple:
        return ()  # every IA3 tuning of a model has one vector per layer, of the layer's width

    def site_tensors(self, user: str, name: str) -> tuple[nn.Parameter, ...]:
        return (self.tuning(user).vector(name),)

    def sites(self, method: IA3) -> dict[str, tuple[int, bool]]:
        sites = ia3_sites(self.model, method)
        for name, (_, ff) in sites.items():
            if self.hooked.get(name, ff) != ff:
                raise TuningError(
                    f"IA3 scales the {'output' if ff else 'input'} of {name!r} for another user of this bank; "
                    "every IA3 tuning of one model must agree on which layers are feed-forward"
                )
        return sites

    def build(self, method: IA3, context: InitContext) -> nn.Module:
        tuning = IA3Tuning(self.sites(method))
        return tuning

    def from_state(self, method: IA3, state: dict[str, torch.Tensor]) -> nn.Module:
        sites = self.sites(method)
        expect_shapes(state, {f"{n}.ia3": (w,) for n, (w, _) in sites.items()}, "IA3")
        tuning = IA3Tuning(sites)
        with torch.no_grad():
            for name in sites:
                tuning.vector(name).copy_(state[f"{name}.ia3"])
        return tuning

    def state(self, user: str) -> dict[str, torch.Tensor]:
        tuning = self.tuning(user)
        return {f"{name}.ia3": tuning.vector(name).detach() for name in tuning.names}

    # --- per row -----------------------------------------------------------------------------

    def install(self, tuning: IA3Tuning) -> None:
        found = dict(self.model.named_modules())
        for name in tuning.names:
            if name in self.hooked:
                continue
            ff = tuning.scales_input[name]
            if ff:
                handle = found[name].register_forward_pre_hook(self._input_hook(name))
            else:
                handle = found[name].register_forward_hook(self._output_hook(name))
            self._handles.append(handle)
            self.hooked[name] = ff

    def _input_hook(self, name: str):
        def hook(module, args):
            scale = self._row_scales(name, args[0])
            return None if scale is None else (args[0] * scale, *args[1:])

        return hook

    def _output_hook(self, name: str):
        def hook(module, args, output):
            scale = self._row_scales(name, output)
            return None if scale is None else output * scale

        return hook

    def _row_scales(self, name: str, h: torch.Tensor) -> torch.Tensor | None:
        """Each row's vector at this layer, shaped to multiply `h` ([batch, ..., width]): 1 on rows of other
        methods, of the base model, of users without this layer, and of a merged user."""
        routing = active()
        batch = h.shape[0]
        if routing is None or not routing.groups(self, batch):
            return None
        if not torch.is_grad_enabled():  # inference: each row's vector from the slot table (ones on other rows)
            found = self.slot_rows(routing, batch)
            if not found or name not in found[0][0].tensors:
                return None
            scale = found[0][1].params(name).vector(0)
        else:
            users, rows, which = routing.stacked(self, batch)
            live = [u for u in users if u != self.merged and name in self.tuning(u).scales_input]
            if not live:
                return None
            ones = torch.ones(h.shape[-1], device=h.device, dtype=self.dtype)
            table = torch.stack([self.tuning(u).vector(name) if u in live else ones for u in users])
            scale = torch.ones(batch, h.shape[-1], device=h.device, dtype=table.dtype).index_copy(0, rows, table[which])
        return scale.view(batch, *[1] * (h.dim() - 2), -1).to(h.dtype)

    # --- merging -----------------------------------------------------------------------------

    def fold(self, user: str, undo: bool) -> None:
        tuning = self.tuning(user)
        if not undo and any((tuning.vector(n) == 0).any() for n in tuning.names):
            raise TuningError(f"the IA3 tuning of {user!r} has a zero entry, so merging it could not be undone")
        found = dict(self.model.named_modules())
        with torch.no_grad():
            for name in tuning.names:
                module, vector = found[name], tuning.vector(name)
                factor = 1 / vector if undo else vector
                # W is [out, in] in nn.Linear, [in, out] in GPT-2's Conv1D: scale the input or output axis.
                axis_is_rows = tuning.scales_input[name] != isinstance(module, nn.Linear)
                weight = module.weight
                weight.mul_((factor[:, None] if axis_is_rows else factor[None, :]).to(weight.dtype))
                if not tuning.scales_input[name] and module.bias is not None:
                    module.bias.mul_(factor.to(module.bias.dtype))


IA3.component = IA3Component
