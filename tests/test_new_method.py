"""A new method is one file: a method defined here, outside the package, and registered, is trained, mixed row
by row with the built-in methods, served by the engine, saved and loaded, and offered by both commands, with
nothing of slimtune's own changed for it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import slimtune
from slimtune import cli, compare
from slimtune.engine import Engine
from slimtune.errors import TuningError
from slimtune.methods import METHODS, Method, method_from_dict, register
from slimtune.methods.base import InitContext, SiteComponent, expect_shapes, site_key
from slimtune.methods.slots import RowParams

from conftest import build
from helpers import methods_for, padded_batch, perturb, real_tokens, vocab_tokenizer

# ---- the whole method: what a contributor writes in methods/<name>.py -------------------------------------


@dataclass(frozen=True)
class OutputGain(Method):
    """A learned gain on the output of each targeted linear layer: h = (1 + g) ⊙ (W x + b), g = 0 at the start."""

    kind = "test-gain"
    default_lr = 1e-3
    compare_lr = 1e-2
    label = "output gain"
    targets: tuple[str, ...] = ("o_proj", "c_proj")

    @classmethod
    def cli_options(cls, options: Any) -> None:
        options.add_argument("--gain-targets", help="comma-separated layer suffixes (default: o_proj,c_proj)")

    @classmethod
    def from_cli(cls, args: argparse.Namespace, task) -> OutputGain:
        return cls(targets=tuple(args.gain_targets.split(","))) if args.gain_targets else cls()


class GainTuning(nn.Module):
    def __init__(self, sites: dict[str, int]):
        super().__init__()
        self.names = list(sites)
        self.gain = nn.ParameterDict({site_key(n): nn.Parameter(torch.zeros(d)) for n, d in sites.items()})


class GainComponent(SiteComponent):
    kind = "test-gain"
    nulls = (0.0,)  # slot 0: a gain of zero changes nothing

    def sites(self, method: OutputGain) -> dict[str, int]:
        found = {n: m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[1]
                 for n, m in self.model.named_modules() if n.split(".")[-1] in method.targets and hasattr(m, "weight")}
        if not found:
            raise TuningError(f"OutputGain: no layer named {method.targets} in {type(self.model).__name__}")
        return found

    def site_value(self, user: str, name: str, out: torch.Tensor) -> torch.Tensor:
        return out * self.tuning(user).gain[site_key(name)]

    def slot_group(self, user: str) -> tuple:
        return ()

    def site_tensors(self, user: str, name: str) -> tuple[nn.Parameter, ...]:
        return (self.tuning(user).gain[site_key(name)],)

    def stacked_apply(self, name: str, group: tuple, params: RowParams, out: torch.Tensor) -> torch.Tensor:
        return out * params.vector(0).view(out.shape[0], *[1] * (out.dim() - 2), out.shape[-1])

    def build(self, method: OutputGain, context: InitContext) -> nn.Module:
        return GainTuning(self.sites(method))

    def from_state(self, method: OutputGain, state: dict[str, torch.Tensor]) -> nn.Module:
        sites = self.sites(method)
        expect_shapes(state, {f"{n}.gain": (d,) for n, d in sites.items()}, "OutputGain")
        tuning = GainTuning(sites)
        with torch.no_grad():
            for n in sites:
                tuning.gain[site_key(n)].copy_(state[f"{n}.gain"])
        return tuning

    def state(self, user: str) -> dict[str, torch.Tensor]:
        tuning = self.tuning(user)
        return {f"{n}.gain": tuning.gain[site_key(n)].detach() for n in tuning.names}


OutputGain.component = GainComponent

# ---- the tests ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def registered():
    register(OutputGain)
    yield
    METHODS.pop(OutputGain.kind, None)


def gained(seed: int = 0) -> slimtune.TunedModel:
    tuned = slimtune.attach(build("llama"), OutputGain())
    perturb(tuned.tuning_parameters(), seed=seed, scale=0.5)
    return tuned


def test_it_starts_as_the_frozen_model_and_trains_its_own_parameters_only():
    model = build("llama")
    ids = torch.randint(2, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    tuned = slimtune.attach(model, OutputGain())
    with torch.no_grad():
        torch.testing.assert_close(tuned(input_ids=ids).logits, before)
    tuned(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tuned.tuning_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert tuned.method.learning_rate() == 1e-3 and tuned.method.learning_rate(study=True) == 1e-2


@pytest.mark.parametrize("serving", [False, True])
def test_its_rows_mix_with_every_built_in_method_each_as_if_alone(serving):
    bank = slimtune.Bank(build("llama"), serving=serving, frozen=serving)
    tunings = {**methods_for("llama"), "gain": OutputGain(), "gain2": OutputGain(targets=("o_proj",))}
    for i, (user, method) in enumerate(tunings.items()):
        bank.add(user, method)
        perturb(bank.user_parameters(user), seed=i, scale=0.3)
    users = ["gain", "lora", None, "prompt2", "gain2", "prefix3", "houlsby", "gain", "bitfit"]
    lengths = [5, 7, 3, 6, 4, 7, 2, 6, 5]
    ids, mask = padded_batch("llama", lengths)
    with torch.no_grad():
        mixed = bank(input_ids=ids, attention_mask=mask, users=users).logits
        for b, user in enumerate(users):
            alone = bank(input_ids=real_tokens(ids, mask, b), users=[user]).logits
            torch.testing.assert_close(mixed[b][mask[b].bool()], alone[0], atol=1e-5, rtol=1e-4)
        gain = bank(input_ids=real_tokens(ids, mask, 0), users=["gain"]).logits
        base = bank(input_ids=real_tokens(ids, mask, 0), users=[None]).logits
    assert not torch.allclose(gain, base, atol=1e-3)  # the gain does something, so the equalities above say something


def test_the_engine_serves_it_beside_lora_token_for_token_as_generate(tmp_path):
    tuned = gained()
    engine = Engine(tuned.model, vocab_tokenizer(), max_batch=4)
    engine.add("gain", tuned)
    engine.add("lora", slimtune.LoRA(rank=4))
    perturb(engine.bank.user_parameters("lora"), seed=3)
    prompts = [[5, 9, 14, 2, 33], [7, 8, 40], [61, 3, 3, 12]]
    users = ["gain", "lora", "gain"]
    handles = [engine.stream(u, p, max_new_tokens=6) for u, p in zip(users, prompts, strict=True)]
    for handle, user, p in zip(handles, users, prompts, strict=True):
        reference = engine.bank.generate(input_ids=torch.tensor([p]), users=[user], do_sample=False,
                                         max_new_tokens=6, pad_token_id=1)[0, len(p):].tolist()
        reference = reference[: reference.index(1)] if 1 in reference else reference
        assert handle.result().token_ids == reference, user
    engine.close()


def test_it_is_saved_and_loaded_as_any_method(tmp_path):
    tuned = gained(seed=4)
    folder = tuned.save(tmp_path / "gain")
    again = slimtune.load(build("llama"), folder)
    assert again.method == tuned.method and isinstance(again.method, OutputGain)
    ids = torch.randint(2, 90, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, tuned(input_ids=ids).logits)
    assert method_from_dict({"kind": "test-gain", "targets": ["o_proj"]}) == OutputGain(targets=("o_proj",))


def test_both_commands_offer_it_with_its_own_options():
    args = cli.parser().parse_args(["train", "--task", "t.csv", "--out", "o", "--method", "test-gain",
                                    "--gain-targets", "o_proj"])
    assert cli.method_from_args(args, None) == OutputGain(targets=("o_proj",))
    assert "test-gain" in compare.choices() and compare.label_of("test-gain") == "output gain"


def test_register_refuses_what_is_not_a_method_and_a_kind_taken_by_another():
    with pytest.raises(TuningError, match="Method subclass"):
        register(dict)

    @dataclass(frozen=True)
    class Impostor(OutputGain):
        pass

    with pytest.raises(TuningError, match="already registered"):
        register(Impostor)
