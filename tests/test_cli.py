"""What the `slimtune` command shows a newcomer: slimtune's own lines (one per phase in a log, never
transformers' loading tables), a warning when a run learnt to answer one label, and `eval --max-length`."""

import csv
import json
import random
import re

import pytest
from tiny import WORDS, model_folder, sentiment_file, tokenizer

from slimtune import cli
from slimtune.data import load_task


def bert_folder(path):
    """A tiny BERT body without a classification head: `slimtune train` gives it a new one."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def padded_file(path, filler: int, rows: int = 120, seed: int = 0):
    """Sentiment examples whose telling word comes after `filler` words that every example shares: cut to
    fewer tokens than the filler, all examples read the same."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            good = rng.random() < 0.5
            writer.writerow([" ".join(["the"] * filler + ["good" if good else "bad", "film"]), "yes" if good else "no"])
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-cli")
    return {"gpt2": model_folder(root / "gpt2"), "bert": bert_folder(root / "bert"),
            "data": sentiment_file(root / "data.csv"), "padded": padded_file(root / "padded.csv", filler=10)}


def train_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--task", str(data), "--out", str(out), "--method", "lora", "--rank", "4",
            "--seed", "1", *extra]


def test_a_run_in_a_log_shows_slimtunes_lines_one_per_phase_and_no_loading_tables(tiny, tmp_path, capfd, caplog):
    """transformers logs its LOAD REPORT (caplog sees it wherever its handler writes); its bars go to stderr."""
    args = train_args(tiny["bert"], tiny["data"], tmp_path / "run", "--steps", "6", "--eval-every", "3",
                      "--eval-examples", "8", "--max-length", "16")
    assert cli.main(args) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["steps"] == 6  # stdout holds the result alone
    assert "\r" not in err and "LOAD REPORT" not in err and "MISSING" not in err and "Loading weights" not in err
    assert "LOAD REPORT" not in caplog.text
    lines = err.splitlines()
    assert lines[0] == "slimtune: new classification head: 2 labels (no, yes), trained with the tuning"
    assert [line.split(":")[0] for line in lines[1:]] == ["validation at step 3", "validation at step 6", "training"]
    assert re.fullmatch(r"training: 6/6 steps in \d+ s \(.+\), loss \d\.\d{3}, accuracy \d\.\d{3}", lines[3])
    assert re.fullmatch(r"validation at step 3: 8/8 examples in \d+ s \(.+\), accuracy \d\.\d{3}, macro_f1 \d\.\d{3}",
                        lines[1])

    assert cli.main(["eval", "--run", str(tmp_path / "run"), "--examples", "10"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["examples"] == 10
    assert "\r" not in err and "LOAD REPORT" not in err and "Loading weights" not in err
    assert "LOAD REPORT" not in caplog.text
    head, evaluated = err.splitlines()
    assert head == "slimtune: new classification head: 2 labels (no, yes), read from the run's tuning"
    assert evaluated.startswith("evaluating data test: 10/10 examples in ")

    # --verbose lets transformers speak: the table the quiet run held back is really there to hold back.
    assert cli.main(["eval", "--run", str(tmp_path / "run"), "--examples", "10", "--verbose"]) == 0
    assert "LOAD REPORT" in caplog.text and "Loading weights" in capfd.readouterr().err


def test_a_run_whose_validation_answers_one_label_says_so(tiny, tmp_path, capfd):
    """Cut to 8 tokens, every example of the padded file reads the same, so every validation example gets
    the same answer; at 32 tokens the telling word is seen and learnt."""
    common = ["--steps", "40", "--lr", "0.01", "--eval-every", "40", "--eval-examples", "12"]
    assert cli.main(train_args(tiny["gpt2"], tiny["padded"], tmp_path / "cut", *common, "--max-length", "8")) == 0
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    [(label, count)] = summary["final_validation"]["predicted_labels"].items()
    assert count == 12
    err = capfd.readouterr().err
    assert err.splitlines()[-1] == (f"slimtune: warning: every validation example got label {label!r}: train longer "
                                    "or raise --lr (this run: 40 steps at lr 0.01)")

    assert cli.main(train_args(tiny["gpt2"], tiny["padded"], tmp_path / "whole", *common, "--max-length", "32")) == 0
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert set(summary["final_validation"]["predicted_labels"]) == {"no", "yes"}
    assert "every validation example" not in capfd.readouterr().err


def test_eval_max_length_defaults_to_the_runs_and_sets_how_much_of_each_input_is_read(tiny, tmp_path):
    run = tmp_path / "run"
    assert cli.main(train_args(tiny["gpt2"], tiny["padded"], run, "--steps", "40", "--lr", "0.01", "--eval-every", "40",
                               "--eval-examples", "12", "--max-length", "32")) == 0
    task = load_task(tiny["padded"], seed=1)

    def evaluated(*extra):
        assert cli.main(["eval", "--run", str(run), *extra]) == 0
        result = json.loads((run / "eval" / "padded-test.json").read_text())
        answers = [json.loads(line)["prediction"] for line in (run / "eval" / "padded-test.predictions.jsonl").open()]
        return result, answers

    result, answers = evaluated()
    assert result["max_length"] == 32 and result["examples"] == len(task.test)
    assert result["accuracy"] > 0.75  # the telling word, 12 tokens into the text, is read
    result, answers = evaluated("--max-length", "8")
    assert result["max_length"] == 8
    assert len(set(answers)) == 1  # only the shared filler is left of every input: one answer for all
