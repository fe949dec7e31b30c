"""The comparison study: prompt design, the compare pipeline on a tiny model, and a smoke run of
the README's main job on the real default model and data."""

import csv
import dataclasses
import json
import re

import pytest
from tiny import model_folder, sentiment_file, tokenizer

import slimtune
from slimtune import compare
from slimtune.data import load_task
from slimtune.design import PromptDesign


@pytest.fixture
def started(monkeypatch):
    """The (configuration, resume) of each configuration process the study starts, in order."""
    calls, real = [], compare.run_child

    def recorded(spec, run_dir, resume, **options):
        calls.append((spec, resume))
        return real(spec, run_dir, resume, **options)

    monkeypatch.setattr(compare, "run_child", recorded)
    return calls


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-compare")
    return {"model": model_folder(root / "model"), "data": sentiment_file(root / "data.csv"),
            "ood": sentiment_file(root / "ood.csv", seed=5)}


def test_prompt_design_slots_the_input_after_instructions_and_demonstrations(tiny):
    task = load_task(tiny["data"])
    fmt = PromptDesign(template="Text : {text} Label :", examples=3, seed=1).format(task, tokenizer())
    prompt = fmt.prompt(task.test[0])
    assert prompt.endswith(f"Text : {task.test[0].text} Label :")
    assert prompt.count("Label :") == 4  # three demonstrations, then the input
    demos = prompt.rsplit("\n\n", 1)[0]
    assert all(f"Label : {word}" in demos or word not in demos for word in ("yes", "no"))
    assert fmt.prompt(task.test[0]) == PromptDesign(template="Text : {text} Label :", examples=3, seed=1).format(
        task, tokenizer()).prompt(task.test[0])


def test_compare_writes_the_table_and_plots(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(tiny["model"]), "--task", str(tiny["data"]), "--ood-task", str(tiny["ood"]),
            "--methods", "design", "prompt", "lora", "full", "--budget", "smoke", "--out", str(out)]
    assert compare.main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["kind"] for r in rows] == ["design", "prompt", "lora", "full"]
    for r in rows:
        assert 0 <= r["in_distribution"] <= 1 and 0 <= r["out_of_distribution"] <= 1
        assert r["peak_memory_bytes"] > 0
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["design"]["trainable"] == 0
    assert 0 < by_kind["lora"]["share"] < by_kind["full"]["share"] == 1.0
    assert by_kind["lora"]["bytes_stored"] < by_kind["full"]["bytes_stored"]
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "| LoRA |" in (out / "results.md").read_text()
    assert (out / "in-vs-ood-model.png").exists() and (out / "score-vs-share-model.png").exists()
    # Each row against model tuning, example by example: the mean difference is the difference of the
    # scores, and its standard error is that of the per-example differences.
    from statistics import stdev

    def hits(kind, side):
        return [float(a["prediction"] == a["reference"]) for a in map(json.loads, open(
            out / "runs" / f"model-{kind}" / f"predictions-{side}.jsonl"))]

    for kind in ("design", "prompt", "lora"):
        for side, key in (("in", "in_distribution"), ("ood", "out_of_distribution")):
            d = [a - b for a, b in zip(hits(kind, side), hits("full", side), strict=True)]
            assert by_kind[kind][f"{key}_vs_model_tuning"] == pytest.approx(by_kind[kind][key] - by_kind["full"][key])
            assert by_kind[kind][f"{key}_vs_model_tuning_se"] == pytest.approx(stdev(d) / len(d) ** 0.5)
    assert "in_distribution_vs_model_tuning" not in by_kind["full"]
    paired = (out / "results.md").read_text().split("Difference from model tuning")[1]
    assert "| LoRA |" in paired and "| model tuning |" not in paired
    # A trained configuration's folder is a run `slimtune eval` reads: it scores its tuning as the study did.
    from slimtune import cli

    run = out / "runs" / "model-lora"
    for task, key in ((tiny["data"], "in_distribution"), (tiny["ood"], "out_of_distribution")):
        assert cli.main(["eval", "--run", str(run), "--task", str(task), "--examples", "8"]) == 0
        result = json.loads((run / "eval" / f"{load_task(task).name}-test.json").read_text())
        assert result["examples"] == 8 and result["accuracy"] == by_kind["lora"][key]
        assert result["accuracy_se"] == by_kind["lora"][f"{key}_all"]["accuracy_se"]
    assert cli.main(["eval", "--run", str(out / "runs" / "model-design")]) == 2
    assert "prompt design trains nothing" in capsys.readouterr().err


def test_the_init_ablation_runs_each_initialisation(tiny, tmp_path):
    out = tmp_path / "ablation"
    args = ["--model", str(tiny["model"]), "--task", str(tiny["data"]), "--budget", "smoke", "--ablation", "init",
            "--out", str(out)]
    assert compare.main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["init"] for r in rows] == ["uniform", "vocab", "labels"]
    assert (out / "ablation-init.png").exists()


def test_studies_sharing_a_runs_folder_train_their_common_configurations_once(tiny, tmp_path, monkeypatch, started):
    """The ablations' default prompt (20 tokens, label-word init on a decoder) is the main study's prompt
    tuning: with one --runs folder it is trained once, and each table labels it its own way."""
    runs = tmp_path / "runs"
    common = ["--model", str(tiny["model"]), "--task", str(tiny["data"]), "--ood-task", str(tiny["ood"]),
              "--budget", "smoke", "--runs", str(runs)]
    assert compare.main([*common, "--methods", "prompt", "--out", str(tmp_path / "main")]) == 0
    [main] = json.loads((tmp_path / "main" / "results.json").read_text())
    started.clear()  # the first study's configurations
    assert compare.main([*common, "--ablation", "init", "--out", str(tmp_path / "init")]) == 0
    assert [c.options for c, _ in started] == [{"init": "uniform"}, {"init": "vocab"}]
    init = json.loads((tmp_path / "init" / "results.json").read_text())
    assert [(r["method"], r["init"], r["length"]) for r in init] == [
        ("prompt tuning, uniform init", "uniform", 20), ("prompt tuning, vocab init", "vocab", 20),
        ("prompt tuning, labels init", "labels", 20)]
    assert init[2]["in_distribution_all"] == main["in_distribution_all"]
    assert init[2]["out_of_distribution_all"] == main["out_of_distribution_all"]
    assert main["method"] == "prompt tuning"  # the shared run's own row keeps the label of the study that made it

    started.clear()
    monkeypatch.setitem(compare.ABLATIONS, "length", [1, 5, 20, 40])  # the tiny model has 64 positions
    assert compare.main([*common, "--ablation", "length", "--out", str(tmp_path / "length")]) == 0
    assert [c.options for c, _ in started] == [{"length": 1}, {"length": 5}, {"length": 40}]
    length = json.loads((tmp_path / "length" / "results.json").read_text())
    assert [r["length"] for r in length] == [1, 5, 20, 40]
    assert length[2]["in_distribution_all"] == main["in_distribution_all"]
    # A shared run made with other settings is still refused: only the labels are not part of a configuration.
    with pytest.raises(slimtune.TuningError, match="ood_task: .*ood.csv' there, .*data.csv' here"):
        compare.main([*common, "--ood-task", str(tiny["data"]), "--methods", "prompt", "--out", str(tmp_path / "other")])


def test_running_the_same_study_again_reuses_finished_runs_and_refuses_other_settings(tiny, tmp_path, monkeypatch,
                                                                                      capfd):
    out = tmp_path / "out"
    args = ["--model", str(tiny["model"]), "--task", str(tiny["data"]), "--ood-task", str(tiny["ood"]),
            "--methods", "design", "lora", "--budget", "smoke", "--out", str(out)]
    assert compare.main(args) == 0
    first = json.loads((out / "results.json").read_text())
    # In a log (not a terminal), a line as each configuration starts and one as each of its phases ends,
    # drawn by the study from what each configuration's own process reports.
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [re.sub(r" in \d+ s .*| \(\d+ s so far\)", "", line) for line in lines] == [
        f"compare 1/2: prompt design (0-shot) on {tiny['model']}", "  evaluating data: 8/8 examples",
        "  evaluating ood (OOD): 8/8 examples", f"compare 2/2: LoRA on {tiny['model']}",
        "  training: 2/2 steps", "  evaluating data: 8/8 examples", "  evaluating ood (OOD): 8/8 examples"]
    assert re.fullmatch(r"  training: 2/2 steps in \d+ s \(.+ steps?/s\), loss \d+\.\d{3}", lines[4])

    def no_child(*a, **k):
        raise AssertionError("a finished configuration was run again")

    monkeypatch.setattr(compare, "run_child", no_child)
    assert compare.main(args) == 0
    assert json.loads((out / "results.json").read_text()) == first
    assert [line.split(": ")[1].split(" in ")[0] for line in capfd.readouterr().err.splitlines()] == [
        "reusing the finished run"] * 2
    # Another out-of-distribution task into the same folder would mix two studies in one table: refused,
    # nothing changed.
    other = [*args[:5], str(tiny["data"]), *args[6:]]
    with pytest.raises(slimtune.TuningError, match="other settings.*ood_task: .*ood.csv' there, .*data.csv' here.*--fresh"):
        compare.main(other)
    assert json.loads((out / "results.json").read_text()) == first
    monkeypatch.undo()
    assert compare.main([*args, "--seed", "1", "--fresh"]) == 0
    assert [r["seed"] for r in json.loads((out / "results.json").read_text())] == [1, 1]


def test_an_interrupted_configuration_resumes_to_the_same_tuning(tiny, tmp_path, monkeypatch, started):
    """A training stopped after its first checkpoint and run again ends with exactly the parameters,
    training-step count and scores of one that ran straight through."""
    from safetensors.torch import load_file

    from slimtune.train import Trainer

    monkeypatch.setitem(compare.BUDGETS, "test", {**compare.BUDGETS["smoke"], "steps": 6, "checkpoint_every": 2})
    spec = compare.Spec(str(tiny["model"]), str(tiny["data"]), str(tiny["ood"]), "lora", "test", 0)
    straight = compare.run_spec(spec, tmp_path / "straight")
    # Each side's answers are kept beside its score, and score to it again.
    for side in ("in", "ood"):
        answers = [json.loads(line) for line in (tmp_path / "straight" / f"predictions-{side}.jsonl").open()]
        assert answers and all(a["text"] and a["reference"] for a in answers)
        hits = sum(a["prediction"] == a["reference"] for a in answers) / len(answers)
        assert hits == pytest.approx(straight[f"{'in_distribution' if side == 'in' else 'out_of_distribution'}_all"]["accuracy"])

    step = Trainer._train_step

    def stop_at_step_3(self, i):
        if i == 3:
            raise KeyboardInterrupt
        return step(self, i)

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(Trainer, "_train_step", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        compare.run_spec(spec, stopped)
    ran = []

    def counted(self, i):
        ran.append(i)
        return step(self, i)

    monkeypatch.setattr(Trainer, "_train_step", counted)
    resumed = compare.run_spec(spec, stopped, resume=True)
    assert ran == [2, 3, 4, 5]  # on from the checkpoint at step 2, not from the start
    for key in ("in_distribution_all", "out_of_distribution_all", "steps", "trainable"):
        assert resumed[key] == straight[key]
    a = load_file(tmp_path / "straight" / "checkpoint" / "trainable.safetensors")
    b = load_file(stopped / "checkpoint" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(__import__("torch").equal(a[k], b[k]) for k in a)
    assert resumed["train_seconds"] > 0
    # The study finds a checkpoint without a finished row (here: a run stopped while evaluating, after its
    # last step) and resumes that configuration instead of training it again.
    smoke = dataclasses.replace(spec, budget="smoke")  # a budget the study's child processes know
    folder = tmp_path / "study" / "runs" / f"model-lora{compare._suffix(spec.options)}"
    compare.earlier_run(smoke, folder)
    alone = compare.run_spec(smoke, folder)
    [row] = compare.run_all([smoke], tmp_path / "study")
    assert [resume for _, resume in started] == [True] and row["in_distribution_all"] == alone["in_distribution_all"]


def test_several_seeds_give_each_seed_and_their_mean(tiny, tmp_path, started):
    out = tmp_path / "out"
    args = ["--model", str(tiny["model"]), "--task", str(tiny["data"]), "--ood-task", str(tiny["ood"]),
            "--methods", "design", "lora", "--budget", "smoke", "--out", str(out)]
    assert compare.main(args) == 0  # seed 0 alone
    started.clear()  # the first study's configurations
    assert compare.main([*args, "--seed", "0", "2"]) == 0
    assert [(c.method, c.seed) for c, _ in started] == [("design", 2), ("lora", 2)]  # seed 0's runs are reused
    rows = json.loads((out / "results.json").read_text())
    assert [(r["kind"], r["seed"]) for r in rows] == [("design", 0), ("design", 2), ("lora", 0), ("lora", 2)]
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["kind"], r["seeds"]) for r in summary] == [("design", [0, 2]), ("lora", [0, 2])]
    for mean, (a, b) in zip(summary, [rows[:2], rows[2:]], strict=True):
        for key in ("in_distribution", "out_of_distribution"):
            assert mean[key] == pytest.approx((a[key] + b[key]) / 2)
            assert mean[f"{key}_sd"] == pytest.approx(abs(a[key] - b[key]) / 2 ** 0.5)
    table = (out / "results.md").read_text()
    lora = summary[1]
    assert f"| LoRA | {tiny['model']} | {lora['in_distribution']:.3f} ± {lora['in_distribution_sd']:.3f} |" in table
    assert f"| LoRA, seed 2 | {tiny['model']} |" in table
    assert (tmp_path / "out" / "runs" / "model-lora-seed2" / "row.json").is_file()


def test_methods_outside_the_default_study_run_when_asked_for_at_their_own_rate_and_settings(tiny, tmp_path):
    """DoRA and IA3 are left out of the default study (it must stay within `make demo`'s minutes) but any
    registered method runs when --methods names it, at its study rate, under its label, as it builds itself."""
    assert "dora" not in compare.METHODS and "ia3" not in compare.METHODS
    out = tmp_path / "out"
    args = ["--model", str(tiny["model"]), "--task", str(tiny["data"]), "--ood-task", str(tiny["ood"]),
            "--methods", "dora", "ia3", "bitfit", "--budget", "smoke", "--out", str(out)]
    assert compare.main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["kind"], r["method"]) for r in rows] == [("dora", "DoRA"), ("ia3", "IA3"), ("bitfit", "BitFit")]
    for r in rows:
        assert r["lr"] == slimtune.methods.METHODS[r["kind"]].compare_lr
        assert 0 <= r["in_distribution"] <= 1 and 0 <= r["out_of_distribution"] <= 1
    # GPT-2: DoRA rank 8 on the fused c_attn (32 -> 96) with a magnitude per output, IA3 on c_attn's 96
    # outputs and the feed-forward output layer's 128 inputs; BitFit on its biases (GPT-2 has them: none added).
    assert [r["trainable"] for r in rows[:2]] == [2 * (8 * (32 + 96) + 96), 2 * (96 + 128)]
    from slimtune.cli import open_model

    model, _ = open_model(str(tiny["model"]), load_task(tiny["data"]))
    assert compare.method_config(compare.Spec(str(tiny["model"]), "", None, "bitfit", "smoke", 0), None, model) == \
        slimtune.BitFit(add_missing=False)


def test_a_failing_configuration_stops_the_study_with_its_error_and_keeps_the_finished_rows(tiny, tmp_path, capfd):
    good = compare.Spec(str(tiny["model"]), str(tiny["data"]), str(tiny["ood"]), "design", "smoke", 0)
    bad = dataclasses.replace(good, model=str(tmp_path / "no-such-model"), method="lora")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="LoRA on .*no-such-model failed; see the error above.*resumes"):
        compare.run_all([good, bad], out)
    assert "no-such-model" in capfd.readouterr().err  # the configuration's own error, from its process
    assert (out / "runs" / compare.run_name(good) / "row.json").is_file()
    assert not (out / "runs" / compare.run_name(bad) / "row.json").exists()
    assert [r["kind"] for r in json.loads((out / "results.json").read_text())] == ["design"]


@pytest.mark.integration
def test_the_main_job_runs_on_the_real_default_in_smoke_mode(tmp_path):
    """`slimtune compare` with no arguments but a smoke budget: SmolLM2, Rotten Tomatoes -> Amazon."""
    out = tmp_path / "compare"
    assert compare.main(["--budget", "smoke", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["kind"] for r in rows} == set(compare.METHODS)
    assert all(r["model"] == "smollm2-135m" and r["ood_task"] == "amazon-food" for r in rows)


def test_prompt_design_on_a_decoder_computes_its_shared_head_once_and_exactly(tiny):
    """The instruction and demonstrations become a prefix of their own keys and values: each input
    is then scored exactly as with the whole prompt written out."""
    import torch
    from transformers import AutoModelForCausalLM

    from slimtune.formats import predict

    task = load_task(tiny["data"])
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    design = PromptDesign(template="Text : {text} Label :", examples=3, seed=2)
    bank, user, fmt = design.prepare(model, tokenizer(), task)
    assert user == "design" and bank.method("design").kind == "prefix"
    written = design.format(task, tokenizer())
    plain = slimtune.Bank(model)
    examples = task.test[:6]
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([fmt.prompt_ids(e)])
            got = bank(input_ids=ids, users=["design"]).logits[0, -1]
            whole = torch.tensor([written.prompt_ids(e)])
            want = plain(input_ids=whole, users=[None]).logits[0, -1]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert predict(bank, fmt, examples, ["design"] * 6) == predict(plain, written, examples, [None] * 6)


def test_a_head_predicts_on_another_tasks_examples(tiny, tmp_path):
    """Out-of-distribution evaluation of a classification head: the examples carry the other task's
    labels, the head answers in its own."""
    from slimtune.data import Example, Task
    from slimtune.formats import Format, predict

    from conftest import build

    train = load_task(tiny["data"])
    other = Task("other", "classification", [Example("good film", "great")], [Example("bad film", "awful")],
                 [Example("good food", "great"), Example("bad soup", "awful")], labels=["awful", "great"])
    model = build("bert")
    model.config.num_labels = 2
    model.classifier = __import__("torch").nn.Linear(32, 2)
    bank = slimtune.Bank(model)
    bank.add("u", slimtune.LoRA(rank=2))
    answers = predict(bank, Format(train, tokenizer(), "head"), other.test, ["u", "u"])
    assert set(answers) <= set(train.labels)


def test_a_heads_labels_map_to_another_task_through_shared_label_words():
    from slimtune.data import Example, Task
    from slimtune.formats import label_translation

    def task(name, words):
        labels = list(words)
        examples = [Example("x", label) for label in labels]
        return Task(name, "classification", examples, examples, examples, labels=labels, label_words=words)

    films = task("films", {"fresh": "positive", "rotten": "negative"})
    food = task("food", {"great": "positive", "other": "negative"})
    assert label_translation(films, food) == {"fresh": "great", "rotten": "other"}
    topics = task("topics", {"sport": "sport", "tech": "tech"})
    with pytest.raises(slimtune.TuningError, match="'fresh'.*no counterpart"):
        label_translation(films, topics)
