"""The trainer and the CLI on a tiny model: it learns, resumes exactly, runs data-parallel, and
trains many users at once."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import model_folder, sentiment_file, tokenizer

import slimtune
from slimtune import cli
from slimtune.data import load_task
from slimtune.formats import Format
from slimtune.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"model": model_folder(root / "model"), "data": sentiment_file(root / "data.csv"),
            "users": sentiment_file(root / "users.csv", users=("alice", "bob"))}


def make_trainer(tiny, out, method, steps=12, on_step=None, checkpoint_every=4):
    from transformers import AutoModelForCausalLM

    task = load_task(tiny["data"], seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    torch.manual_seed(0)
    tuned = slimtune.attach(model, method, tokenizer=tokenizer())
    fmt = Format.for_model(task, tokenizer(), model, max_length=16)
    config = TrainConfig(steps=steps, batch_size=8, grad_accum=2, eval_every=6, eval_examples=12, lr=0.01,
                         checkpoint_every=checkpoint_every, seed=3)
    users = ["default"] * len(task.train)
    return Trainer(tuned.bank, fmt, config, out, task.train, users, task.validation, users[: len(task.validation)],
                   on_step=on_step), tuned


def test_the_trainer_improves_a_tiny_model(tiny, tmp_path):
    trainer, tuned = make_trainer(tiny, tmp_path, slimtune.LoRA(rank=4), steps=30)
    summary = trainer.run()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert summary["best_validation_accuracy"] >= 0.75
    assert summary["peak_memory_bytes"] > 0 and summary["train_seconds"] > 0
    assert (tmp_path / "tuning" / "slimtune.json").is_file()


def test_without_validation_data_the_final_tuning_is_kept(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer, tuned = make_trainer(tiny, tmp_path, slimtune.LoRA(rank=2), steps=5)
    trainer.validation, trainer.validation_users = [], []
    summary = trainer.run()
    assert summary["best_step"] is None and summary["final_validation"] is None
    saved = slimtune.load(AutoModelForCausalLM.from_pretrained(tiny["model"]), tmp_path / "tuning")
    final = list(tuned.bank.user_parameters("default"))
    assert final and all(torch.equal(a, b) for a, b in zip(final, saved.bank.user_parameters("default"), strict=True))


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("method", [slimtune.PrefixTuning(length=3), slimtune.Adapter(size=4)], ids=["prefix", "adapter"])
def test_an_interrupted_run_resumes_to_the_same_end(tiny, tmp_path, method):
    whole, _ = make_trainer(tiny, tmp_path / "whole", method)
    whole.run()

    def stop(step):
        if step == 7:  # after the checkpoint of step 4, before the one of step 8
            raise Interrupted

    cut, _ = make_trainer(tiny, tmp_path / "cut", method, on_step=stop)
    with pytest.raises(Interrupted):
        cut.run()
    resumed, _ = make_trainer(tiny, tmp_path / "cut", method)
    resumed.run(resume=True)
    a = load_file(tmp_path / "whole" / "checkpoint" / "trainable.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoint" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "log.jsonl").read_text() == (tmp_path / "cut" / "log.jsonl").read_text()


def test_resume_without_a_checkpoint_is_a_clear_error(tiny, tmp_path):
    trainer, _ = make_trainer(tiny, tmp_path, slimtune.LoRA(rank=2))
    with pytest.raises(slimtune.TuningError, match="nothing to resume"):
        trainer.run(resume=True)


def cli_train(tiny, out, *extra):
    return ["train", "--model", str(tiny["model"]), "--task", str(tiny["data"]), "--out", str(out), "--max-length", "16",
            "--eval-every", "5", "--eval-examples", "8", "--seed", "1", *extra]


def test_two_processes_equal_one_at_the_same_global_batch(tiny, tmp_path):
    args = ["--method", "prefix", "--length", "3", "--steps", "5", "--batch-size", "8"]
    assert cli.main(cli_train(tiny, tmp_path / "one", *args)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "slimtune.cli", *cli_train(tiny, tmp_path / "two", *args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(tmp_path / "one" / "checkpoint" / "trainable.safetensors")
    two = load_file(tmp_path / "two" / "checkpoint" / "trainable.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2


def test_one_tuning_per_user_in_one_run(tiny, tmp_path):
    args = cli_train(tiny, tmp_path, "--method", "lora", "--rank", "4", "--steps", "40", "--lr", "0.01",
                     "--user-column", "user")
    args[args.index("--task") + 1] = str(tiny["users"])
    assert cli.main(args) == 0
    store = slimtune.Store(tmp_path / "store")
    assert store.names() == ["alice", "bob"]
    assert store.entry("alice").task["labels"] and store.entry("alice").kind == "lora"
    assert cli.main(["eval", "--run", str(tmp_path), "--split", "test"]) == 0
    result = json.loads((tmp_path / "eval" / "users-test.json").read_text())
    answers = [json.loads(line) for line in (tmp_path / "eval" / "users-test.predictions.jsonl").open()]
    assert len(answers) == result["examples"] and {a["group"] for a in answers} == {"alice", "bob"}
    assert sum(a["prediction"] == a["reference"] for a in answers) / len(answers) == pytest.approx(result["accuracy"])
    # alice and bob have opposite labels for the same texts: only per-user tunings can beat chance.
    assert result["accuracy"] > 0.75


def test_cli_reports_bad_input_clearly(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    args = cli_train(tiny, tmp_path / "run", "--method", "lora")
    args[args.index("--task") + 1] = str(empty)
    assert cli.main(args) == 2
    assert "empty" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_the_fused_language_model_loss_equals_the_ordinary_one(arch):
    from slimtune.losses import fusable_head, linear_cross_entropy, loss_sum

    from conftest import build

    model = build(arch)
    tuned = slimtune.attach(model, slimtune.PromptTuning(length=3))
    ids = torch.randint(2, 90, (3, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) < 0.3, -100)
    head = fusable_head(model)
    assert head is model.get_output_embeddings()
    want = loss_sum(tuned(input_ids=ids).logits, labels)
    want.backward()
    want_grad = tuned.tuning_parameters()[0].grad.clone()
    tuned.zero_grad()
    hidden = tuned.bank(input_ids=ids, users=["default"] * 3, hidden_states_only=True).last_hidden_state
    got = linear_cross_entropy(hidden, head, labels, chunk=4)
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(tuned.tuning_parameters()[0].grad, want_grad, atol=1e-5, rtol=1e-4)
    assert fusable_head(slimtune.attach(build(arch), slimtune.FullFineTuning()).model) is None  # a trained head


def test_predicting_batch_by_batch_gives_predicts_answers_and_counts_every_example(tiny):
    from transformers import AutoModelForCausalLM

    from slimtune.formats import predict
    from slimtune.progress import Progress
    from slimtune.train import predict_with_progress

    class Counted(Progress):
        def __init__(self):
            self.advances = []

        def advance(self, n=1, **figures):
            self.advances.append(n)

    task = load_task(tiny["data"], seed=0)
    tuned = slimtune.attach(AutoModelForCausalLM.from_pretrained(tiny["model"]), slimtune.PromptTuning(length=3),
                            tokenizer=tokenizer())
    fmt = Format.for_model(task, tokenizer(), tuned.model, max_length=16)
    examples = task.train[:37]
    counted = Counted()
    answers = predict_with_progress(tuned.bank, fmt, examples, ["default"] * 37, counted, batch_size=8)
    assert answers == predict(tuned.bank, fmt, examples, ["default"] * 37, batch_size=8)
    assert counted.advances == [8, 8, 8, 8, 5]


def test_a_phase_in_a_log_is_one_line_and_on_a_terminal_a_bar_with_its_scores_kept():
    import io

    from slimtune.progress import Display, Relay

    log = io.StringIO()
    display = Display(log, terminal=False)
    display.start("training", 4, "step")
    for loss in (0.9, 0.7, 0.5):
        display.advance(1, loss=loss)
    display.start("validation at step 3", 10, "example")
    display.advance(10)
    display.end(accuracy=0.8)
    display.advance(1, loss=0.4)
    display.end()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2
    assert re.fullmatch(r"validation at step 3: 10/10 examples in 0 s \(.+ examples/s\), accuracy 0\.800", lines[0])
    assert re.fullmatch(r"training: 4/4 steps in 0 s \(.+ steps/s\), loss 0\.400", lines[1])

    # The same events sent from another process through a pipe draw the same lines there.
    import multiprocessing

    receive, send = multiprocessing.Pipe(duplex=False)
    relay = Relay(send)
    relay.start("training", 2, "step", done=1)
    relay.advance(1, loss=0.25)
    relay.end()
    relayed = io.StringIO()
    there = Display(relayed, terminal=False, depth=1)
    for _ in range(3):
        there.apply(receive.recv())
    assert re.fullmatch(r"  training: 2/2 steps \(resumed at 1\) in 0 s \(.+\), loss 0\.250\n", relayed.getvalue())

    # On a terminal: a bar per phase; the inner one vanishes, its scores left as a line above the kept bar.
    screen = io.StringIO()
    display = Display(screen, terminal=True)
    display.start("training", 2, "step")
    display.advance(1, loss=0.5)
    display.start("validation at step 1", 4, "example")
    display.advance(4)
    display.end(accuracy=0.75)
    display.advance(1, loss=0.25)
    display.end()
    drawn = screen.getvalue()
    assert "\r" in drawn and "2/2" in drawn and "loss=0.250" in drawn
    assert re.search(r"validation at step 1: 4/4 examples in 0 s \(.+\), accuracy 0\.750\n", drawn)
