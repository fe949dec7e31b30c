"""What each method declares for the trainer, the comparison study and the command line: its learning
rates, its options and how its config is built from them, so that `slimtune train --method <kind>` and
`slimtune compare --methods <kind>` take any registered method without being taught its name."""

import argparse
import json
import math
from dataclasses import dataclass

import pytest
import torch
from tiny import model_folder, sentiment_file

import slimtune
from slimtune import cli, compare
from slimtune.data import load_task
from slimtune.methods import METHODS, Method


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-options")
    return {"model": model_folder(root / "gpt2"), "data": sentiment_file(root / "data.csv")}


def parsed(*argv: str) -> argparse.Namespace:
    return cli.parser().parse_args(["train", "--task", "t.csv", "--out", "o", *argv])


@pytest.mark.parametrize("kind", list(METHODS))
def test_every_registered_method_has_learning_rates_a_label_and_is_a_choice_of_both_commands(kind):
    method = METHODS[kind]
    for rate in (method().learning_rate(), method().learning_rate(study=True), method.default_lr, method.compare_lr):
        assert isinstance(rate, float) and math.isfinite(rate) and 0 < rate < 1
    assert method.label and compare.label_of(kind) == method.label
    assert kind in compare.choices()
    assert parsed("--method", kind).method == kind


@pytest.mark.parametrize("kind", list(METHODS))
def test_every_method_built_from_the_default_options_is_its_default_config(kind):
    """No method option given: what `slimtune train --method <kind>` trains is `<Method>()` (prompt tuning
    without a task starts from sampled vocabulary, its default)."""
    assert cli.method_from_args(parsed("--method", kind), None) == METHODS[kind]()


def test_the_rates_moved_into_the_methods_are_the_ones_the_tables_held():
    """The trainer's and the study's tables, by method (prefix-mlp: a prefix through Li & Liang's MLP, the
    default), as they were before each method declared its own; DoRA takes LoRA's, IA3 its own."""
    default = {"prompt": 3e-2, "prefix-mlp": 1e-4, "adapter": 1e-3, "lora": 1e-3, "dora": 1e-3, "ia3": 3e-3,
               "bitfit": 2e-3, "full": 3e-5}
    study = {"prompt": 0.3, "prefix-mlp": 3e-4, "adapter": 2e-3, "lora": 2e-3, "dora": 2e-3, "ia3": 1e-2,
             "bitfit": 1e-2, "full": 5e-5}
    for kind, method in METHODS.items():
        key = "prefix-mlp" if kind == "prefix" else kind
        assert (method().learning_rate(), method().learning_rate(study=True)) == (default[key], study[key])
    direct = slimtune.PrefixTuning(reparam=None)
    assert (direct.learning_rate(), direct.learning_rate(study=True)) == (5e-3, 1e-2)


def test_each_methods_options_reach_its_config(tiny):
    task = load_task(tiny["data"])
    assert cli.method_from_args(parsed("--method", "lora", "--rank", "4", "--alpha", "8", "--dropout", "0.1",
                                       "--targets", "q_proj,v_proj", "--rslora"), task) == slimtune.LoRA(
        rank=4, alpha=8.0, dropout=0.1, targets=("q_proj", "v_proj"), rslora=True)
    dora = cli.method_from_args(parsed("--method", "dora", "--rank", "2", "--rslora", "--targets", "c_attn"), task)
    assert type(dora) is slimtune.DoRA and dora == slimtune.DoRA(rank=2, targets=("c_attn",), rslora=True)
    assert cli.method_from_args(parsed("--method", "ia3", "--targets", "k_proj,v_proj,down_proj",
                                       "--feedforward", "down_proj"), task) == slimtune.IA3(
        targets=("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",))
    # The options as they were: prompt tuning on a classification task starts from its label words, --length is
    # prompt's and prefix's, --reparam none is P-tuning v2.
    prompt = cli.method_from_args(parsed("--method", "prompt", "--length", "5"), task)
    assert (prompt.length, prompt.init, prompt.label_words) == (5, "labels", ("no", "yes"))
    assert cli.method_from_args(parsed("--method", "prefix", "--length", "3", "--reparam", "none"), task) == \
        slimtune.PrefixTuning(length=3, reparam=None)
    assert cli.method_from_args(parsed("--method", "adapter", "--size", "16", "--placement", "pfeiffer",
                                       "--activation", "gelu"), task) == slimtune.Adapter(16, "pfeiffer", "gelu")
    assert cli.method_from_args(parsed("--method", "bitfit", "--add-missing"), task) == slimtune.BitFit(add_missing=True)


def test_an_option_two_methods_share_is_added_once_and_its_help_names_each():
    help_text = " ".join(cli.parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "--length LENGTH prompt: soft prompt tokens (default 20); prefix: positions per layer (default 10)" in help_text
    assert "--rslora lora, dora: scale by alpha / sqrt(rank)" in help_text
    assert "ia3: comma-separated layer names" in help_text


def test_methods_sharing_an_option_must_agree_on_its_default():
    @dataclass(frozen=True)
    class Longer(Method):
        kind = "longer"

        @classmethod
        def cli_options(cls, options):
            options.add_argument("--length", type=int, default=50, help="another default")

    options = cli.MethodOptions(argparse.ArgumentParser().add_argument_group("method options"))
    for kind, method in (("prompt", METHODS["prompt"]), ("longer", Longer)):
        options.kind = kind
        if method is Longer:
            with pytest.raises(ValueError, match="--length of method 'longer'"):
                method.cli_options(options)
        else:
            method.cli_options(options)


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_train_runs_dora_and_ia3_at_their_rate_and_saves_what_load_reads_back(kind, tiny, tmp_path, monkeypatch):
    """`slimtune train --method dora|ia3` without --lr (a KeyError before the methods declared their rates):
    it trains at the method's rate, and the saved tuning loads onto a fresh model to the trained logits."""
    trained = []

    class Recorded(cli.Trainer):
        def run(self, resume=False):
            summary = super().run(resume)
            trained.append(self.bank)
            return summary

    monkeypatch.setattr(cli, "Trainer", Recorded)
    run = tmp_path / "run"
    # One validation, at the last step: the saved (best) tuning is the final one.
    assert cli.main(["train", "--model", str(tiny["model"]), "--task", str(tiny["data"]), "--out", str(run),
                     "--method", kind, "--steps", "6", "--eval-every", "6", "--eval-examples", "8",
                     "--max-length", "16"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lr"] == METHODS[kind].default_lr
    assert json.loads((run / "run.json").read_text())["method"]["kind"] == kind

    ids = torch.tensor([[3, 7, 14, 10, 12, 4, 7], [3, 7, 15, 11, 13, 4, 7]])
    (bank,) = trained
    bank.eval()
    model, tokenizer = cli.open_model(str(tiny["model"]), load_task(str(tiny["data"])))
    with torch.no_grad():
        want = slimtune.TunedModel(bank, "default")(input_ids=ids).logits
        base = model(input_ids=ids).logits
        got = slimtune.load(model, run / "tuning", tokenizer=tokenizer)(input_ids=ids).logits
    assert not torch.allclose(want, base)  # it trained something
    torch.testing.assert_close(got, want)
