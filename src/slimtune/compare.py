"""`slimtune compare`: every method on the same frozen model, the same data, the same evaluation.

Model tuning (full fine-tuning), prompt design (no training), prompt tuning, prefix tuning,
adapters, LoRA and BitFit (and, given in `--methods`, any other method: DoRA, IA3) are trained and
evaluated on one task, scored in distribution and on an out-of-distribution task, and written to a
folder as a table (Markdown, CSV, JSON) and plots.
Each trained method runs in its own process, so its peak memory is its own. `--ablation init`
and `--ablation length` compare prompt-tuning initialisations and prompt lengths instead.

A study can be stopped and run again with the same command: each configuration's finished row is kept in
its run folder and reused, and an interrupted training resumes from its last checkpoint (`--fresh`
discards earlier runs instead). Studies given the same `--runs` folder share their common configurations
(the ablations' default prompt is the main study's prompt tuning).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import TuningError
from .methods import METHODS as TUNING_METHODS
from .methods import PromptTuning
from .progress import Display, Progress, Relay, Study
from .quantize import SCHEMES

# Budgets: `quick` finishes in minutes on 2 CPU cores, `full` is for published figures, `smoke`
# only proves the pipeline runs (CI). A training checkpoints every `checkpoint_every` steps (None: at its end).
BUDGETS = {
    "smoke": {"steps": 2, "batch_size": 4, "max_length": 48, "test_examples": 8, "checkpoint_every": None},
    "quick": {"steps": 40, "batch_size": 8, "max_length": 48, "test_examples": 200, "checkpoint_every": None},
    "full": {"steps": 400, "batch_size": 16, "max_length": 128, "test_examples": None, "checkpoint_every": 50},
}
# Prompt design trains nothing: the study's own configurations beside the tuning methods.
DESIGNS = {"design": "prompt design (0-shot)", "design-4shot": "prompt design (4-shot)"}
# The default study; any registered method can be added with --methods (DoRA and IA3 are left out of the
# default so that `make demo` stays under 15 minutes on 2 cores). A method's learning rate for these short
# budgets, its settings and its row label are its own (`Method.compare_lr`, `for_study`, `label`).
METHODS = ["full", "design", "design-4shot", "prompt", "prefix", "adapter", "lora", "bitfit"]


def choices() -> list[str]:
    """What `--methods` takes: the prompt designs and every registered method (one registered after import too)."""
    return [*DESIGNS, *TUNING_METHODS]


def label_of(kind: str) -> str:
    """A configuration's row label: a design's, or the method's own (`Method.label`)."""
    method = TUNING_METHODS.get(kind)
    return DESIGNS.get(kind) or (method.label if method is not None and method.label else kind)


ABLATIONS = {"init": ["uniform", "vocab", "labels"], "length": [1, 5, 20, 100]}  # prompt-tuning settings compared


@dataclass
class Spec:
    """One configuration, run in a child process."""

    model: str
    task: str
    ood_task: str | None
    method: str  # a key of METHODS, or "prompt" with options
    budget: str
    seed: int
    options: dict = field(default_factory=dict)  # method settings that differ from its defaults (ablations)
    label: str = ""
    # Settings shown in the row, defaults included (an ablation's `init` and `length`). Like `label`, not
    # part of what the configuration is: runs that differ only in these two are the same run.
    shown: dict = field(default_factory=dict)
    quantize: str | None = None  # the base's linear weights quantised with this scheme (see `slimtune.quantize`)


def identity(spec: dict) -> dict:
    """What makes two configurations the same run: everything but how the row is labelled. An unquantised
    base is left out, so runs made before `quantize` existed are the same runs as now."""
    return {k: v for k, v in spec.items() if k not in ("label", "shown") and not (k == "quantize" and v is None)}


def method_config(spec: Spec, task, model):
    """The config of a trained configuration, as its method builds it for the study (`Method.for_study`)."""
    from slimtune.models import model_family

    return TUNING_METHODS[spec.method].for_study(task, model, model_family(spec.model), spec.options)


def run_spec(spec: Spec, out: Path, resume: bool = False, progress: Progress | None = None) -> dict:
    """Train (unless prompt design) and evaluate one configuration; returns its table row. With `resume`
    the training goes on from the last checkpoint in `out`. `progress` shows its training and evaluations
    (default: a `Display` on stderr)."""
    import torch

    import slimtune
    from slimtune.cli import open_model
    from slimtune.data import load_task
    from slimtune.design import PromptDesign
    from slimtune.formats import Format, label_translation, metrics, write_predictions
    from slimtune.quantize import check_method, model_bytes, parameter_count
    from slimtune.train import TrainConfig, Trainer, peak_memory, predict_with_progress

    budget = BUDGETS[spec.budget]
    progress = progress or Display()
    torch.manual_seed(spec.seed)
    task = load_task(spec.task, seed=spec.seed)
    ood = load_task(spec.ood_task, seed=spec.seed) if spec.ood_task else None
    model, tokenizer = open_model(spec.model, task, quantize=spec.quantize)
    n_params = parameter_count(model)  # a quantised weight counted as the weights it stands for
    row = {"method": spec.label or label_of(spec.method), "kind": spec.method, "model": spec.model,
           "model_parameters": n_params, "task": task.name, "ood_task": ood.name if ood else None, "seed": spec.seed,
           "budget": spec.budget, **spec.options, "quantize": spec.quantize,
           # the loaded frozen model: its tensors as stored, and this process's resident memory then
           "model_bytes": model_bytes(model), "rss_after_load_bytes": resident_bytes()}
    test = task.test[: budget["test_examples"]]
    ood_test = ood.test[: budget["test_examples"]] if ood else []
    if task.shifted_test:  # its test split is the shifted one: in distribution is its validation split
        ood, ood_test = task, test
        test = task.validation[: budget["test_examples"]]
        seen, unseen = task.shifted_test
        row.update(task=f"{task.name} ({seen})", ood_task=f"{task.name} ({unseen})")

    def predict(bank, fmt, examples, users, side):
        progress.start(f"evaluating {row['task'] if side == 'in' else row['ood_task'] + ' (OOD)'}", len(examples),
                       "example")
        predictions = predict_with_progress(bank, fmt, examples, users, progress)
        progress.end()
        return predictions

    def scored(t, examples, predictions, side):  # the answers are kept beside the scores: predictions-in/-ood.jsonl
        write_predictions(out / f"predictions-{side}.jsonl", examples, predictions)
        return metrics(t, examples, predictions)

    started = time.perf_counter()
    if spec.method.startswith("design"):
        if type(model).__name__.endswith("ForSequenceClassification"):
            return {**row, "skipped": f"prompt design needs a language-model head; {spec.model} has none"}
        design = PromptDesign(examples=4 if spec.method == "design-4shot" else 0, seed=spec.seed)
        scores = {}
        for name, t, examples in [("in", task, test), ("ood", ood, ood_test)]:
            if t is None:
                continue
            bank, user, fmt = design.prepare(model, tokenizer, t, max_length=budget["max_length"])
            scores[name] = scored(t, examples, predict(bank, fmt, examples, [user] * len(examples), name), name)
            bank.detach()
        head, cue = design.parts(task, tokenizer)
        row.update(trainable=0, share=0.0, bytes_stored=len((head + cue).encode()), train_seconds=0.0, steps=0)
    else:
        method = method_config(spec, task, model)
        try:
            check_method(method, model)
        except TuningError as refused:
            return {**row, "skipped": str(refused)}
        tuned = slimtune.attach(model, method, tokenizer=tokenizer)
        fmt = Format.for_model(task, tokenizer, model, max_length=budget["max_length"])
        config = TrainConfig(steps=budget["steps"], batch_size=budget["batch_size"], lr=method.learning_rate(study=True),
                             eval_every=budget["steps"], seed=spec.seed, warmup=0.1,
                             checkpoint_every=budget["checkpoint_every"])
        users = ["default"] * len(task.train)
        # No validation passes: the study scores the final tuning on the test sets, never picks a step.
        trainer = Trainer(tuned.bank, fmt, config, out, task.train, users, [], [], progress=progress)
        summary = trainer.run(resume=resume)
        tuned.eval()
        scores = {"in": scored(task, test, predict(tuned.bank, fmt, test, ["default"] * len(test), "in"), "in")}
        if ood is not None:
            ood_fmt = Format.for_model(ood, tokenizer, model, max_length=budget["max_length"])
            if fmt.style == "head":  # the head answers in the training task's labels
                translation = label_translation(task, ood)
                predictions = [translation[p] for p in predict(tuned.bank, fmt, ood_test, ["default"] * len(ood_test), "ood")]
            else:
                predictions = predict(tuned.bank, ood_fmt, ood_test, ["default"] * len(ood_test), "ood")
            scores["ood"] = scored(ood, ood_test, predictions, "ood")
        report = slimtune.parameter_report(tuned)
        row.update(trainable=report.trainable, share=report.trainable / n_params, bytes_stored=report.bytes_stored,
                   train_seconds=summary["train_seconds"], steps=summary["steps"], lr=summary["lr"])
    key = "accuracy" if task.kind == "classification" else "rougeL"
    row["metric"] = key
    for side, name in SIDES:
        if side in scores:  # the score, its standard error over the test examples, and every metric
            row[name], row[f"{name}_se"], row[f"{name}_all"] = scores[side][key], scores[side][f"{key}_se"], scores[side]
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    row["peak_memory_bytes"] = peak_memory(next(model.parameters()).device)
    return row


def resident_bytes() -> int:
    """This process's resident memory now (Linux; 0 where /proc is missing), not its peak. Right after loading,
    the weights of a model read from an fp32 file are mapped from it, and pages not yet read are not counted;
    a quantised model's weights were all read to quantise them."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


# --- the parent: run every configuration in its own process, then write tables and plots ----------

# What a configuration's process needs, imported once by the server its processes are forked from.
CHILD_MODULES = ["torch", "transformers", "slimtune", "slimtune.cli", "slimtune.data", "slimtune.design",
                 "slimtune.formats", "slimtune.train", "slimtune.compare"]


def run_child(spec: Spec, run_dir: Path, resume: bool, progress: Progress | None = None) -> dict | None:
    """Run one configuration in a process of its own, so that its peak memory is its own; its row, or
    None when it failed (its error is on stderr). Its phases (training steps, evaluations) come back
    through the same pipe as its row and go to `progress`, in this process.

    The process is forked from a server that has imported torch and transformers once, instead of
    starting a fresh interpreter that spends seconds importing them for every configuration. The
    server starts with the libraries' progress bars off: the study draws its own.
    """
    import multiprocessing

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        from multiprocessing import forkserver

        context.set_forkserver_preload(CHILD_MODULES)
        before = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"
        try:
            forkserver.ensure_running()
        finally:
            if before is None:
                del os.environ["TQDM_DISABLE"]
            else:
                os.environ["TQDM_DISABLE"] = before
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(asdict(spec), str(run_dir), resume, send))
    process.start()
    send.close()
    progress = progress or Progress()
    row = None
    try:
        while True:
            message = receive.recv()
            if message[0] == "row":
                row = message[1]
                break
            progress.apply(message)
    except EOFError:  # it ended without a row
        row = None
    finally:
        receive.close()
        process.join()
        progress.close()
    return row if process.exitcode == 0 else None


def _child(spec: dict, run_dir: str, resume: bool, send) -> None:
    """A configuration's process: its phases and then its row go back to the study; what the libraries
    print is dropped."""
    os.environ["TQDM_DISABLE"] = "1"  # for libraries not imported yet (all of them where processes are spawned)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of this process)
    row = run_spec(Spec(**spec), Path(run_dir), resume=resume, progress=Relay(send))
    send.send(("row", row))
    send.close()


def run_all(specs: list[Spec], out: Path, progress_label: str = "compare", fresh: bool = False,
            runs: Path | None = None) -> list[dict]:
    """Run each configuration in its own process (or reuse its finished run); rows in spec order.

    Each configuration runs in a folder of its own under `runs` (default `out/runs`). Studies given the
    same `runs` share the configurations they have in common: each is trained once.
    """
    from . import storage

    out.mkdir(parents=True, exist_ok=True)
    runs = runs or out / "runs"
    rows = []
    study = Study(len(specs), progress_label)
    try:
        for spec in specs:
            label = spec.label or label_of(spec.method)
            name = f"{label} on {spec.model}"
            run_dir = runs / run_name(spec)
            row = earlier_run(spec, run_dir, fresh)
            if row is not None:
                study.reused(f"{name}: reusing the finished run in {run_dir} (--fresh runs it again)")
            else:
                resume = (run_dir / "checkpoint" / "state.pt").is_file()
                phases = study.configuration(name + (" (resumed)" if resume else ""))
                row = run_child(spec, run_dir, resume, progress=phases)
                if row is None:
                    raise RuntimeError(f"{name} failed; see the error above. Running the same command again resumes "
                                       "it from its last checkpoint")
                storage.atomic_write_json(run_dir / "row.json", row)
                study.finished(outcome(row))
            rows.append({**row, "method": label, **spec.shown, "run": str(run_dir)})
            write_table(rows, out)
    finally:
        study.close()
    return rows


def outcome(row: dict) -> str:
    """A finished configuration's scores in a few words: `accuracy 0.795, OOD 0.735`."""
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    metric = row.get("metric", "score")
    return f"{metric} {row['in_distribution']:.3f}" + (
        f", OOD {row['out_of_distribution']:.3f}" if "out_of_distribution" in row else "")


def earlier_run(spec: Spec, run_dir: Path, fresh: bool = False) -> dict | None:
    """The row of this configuration's finished run in `run_dir`, or None when it has to run (again).

    `run_dir` records the settings it was made with; a folder made with other settings is refused
    rather than mixed into this table. `fresh` discards what is there.
    """
    from . import storage

    recorded = run_dir / "spec.json"
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    if recorded.is_file():
        theirs, ours = identity(json.loads(recorded.read_text())), identity(asdict(spec))
        if theirs != ours:
            differ = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in ours if theirs.get(k) != ours[k])
            raise TuningError(f"{run_dir} holds a run made with other settings ({differ}); give another --out, "
                              "or --fresh to discard it")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        storage.atomic_write_json(recorded, asdict(spec))
    row = run_dir / "row.json"
    return json.loads(row.read_text()) if row.is_file() else None


def slug(model: str) -> str:
    """A file-name-safe name for a model given by name or path."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name or model)


def _suffix(options: dict) -> str:
    return "".join(f"-{k}{v}" for k, v in sorted(options.items()))


def run_name(spec: Spec) -> str:
    """The folder name of a configuration's run: model, method, non-default settings, and the seed unless 0."""
    return (f"{slug(spec.model)}{'-' + spec.quantize if spec.quantize else ''}-{spec.method}{_suffix(spec.options)}"
            + (f"-seed{spec.seed}" if spec.seed else ""))


def summarise(rows: list[dict]) -> list[dict]:
    """One row per configuration over its seeds: scores as mean and sample standard deviation, the
    rest from its first seed (train time: the mean; peak memory: the largest)."""
    from statistics import fmean, stdev

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"]), []).append(r)
    out = []
    for group in groups.values():
        first = group[0]
        if "skipped" in first:
            out.append(first)
            continue
        row = {**first, "seeds": [r["seed"] for r in group], "train_seconds": fmean(r["train_seconds"] for r in group),
               "peak_memory_bytes": max(r["peak_memory_bytes"] for r in group)}
        for key in ("in_distribution", "out_of_distribution"):
            if key in first:
                values = [r[key] for r in group]
                row[key], row[f"{key}_sd"] = fmean(values), stdev(values) if len(values) > 1 else 0.0
        for key in ("seed", "in_distribution_all", "out_of_distribution_all", "in_distribution_se",
                    "out_of_distribution_se", "wall_seconds", "run"):
            row.pop(key, None)
        out.append(row)
    return out


COLUMNS = ["method", "model", "in_distribution", "out_of_distribution", "trainable", "share", "bytes_stored",
           "train_seconds", "peak_memory_bytes", "in_distribution_se", "out_of_distribution_se",
           "in_distribution_vs_model_tuning", "in_distribution_vs_model_tuning_se",
           "out_of_distribution_vs_model_tuning", "out_of_distribution_vs_model_tuning_se"]
SIDES = (("in", "in_distribution"), ("ood", "out_of_distribution"))


def pair_with_model_tuning(rows: list[dict]) -> None:
    """Each row's difference from model tuning on the same model, example by example over the same test
    examples, with its standard error (`<side>_vs_model_tuning`, `..._se`), added in place: the two rows
    answer the same examples, so their difference is measured far more precisely than the two scores'
    separate standard errors suggest. Read from the answers kept in each run's folder; a row without
    them (or a study over several seeds, or one without model tuning) gets none."""
    from .formats import example_scores, standard_error

    if several_seeds(rows):
        return
    answers: dict[Path, tuple[list, list[float]]] = {}

    def scored(row: dict, side: str) -> tuple[list, list[float]] | None:
        if "run" not in row:
            return None
        path = Path(row["run"]) / f"predictions-{side}.jsonl"
        if not path.is_file():
            return None
        if path not in answers:
            records = [json.loads(line) for line in path.read_text().splitlines()]
            kind = "classification" if row["metric"] == "accuracy" else "generation"
            answers[path] = ([(a["text"], a.get("text_pair")) for a in records],
                             example_scores(kind, [a["reference"] for a in records], [a["prediction"] for a in records]))
        return answers[path]

    bases = {r["model"]: r for r in rows if r.get("kind") == "full" and "skipped" not in r}
    for row in rows:
        base = bases.get(row["model"])
        if base is None or row is base or "skipped" in row:
            continue
        for side, name in SIDES:
            mine, theirs = scored(row, side), scored(base, side)
            if mine is None or theirs is None or mine[0] != theirs[0]:  # not the same examples: no pairing
                continue
            differences = [a - b for a, b in zip(mine[1], theirs[1], strict=True)]
            row[f"{name}_vs_model_tuning"] = sum(differences) / len(differences)
            row[f"{name}_vs_model_tuning_se"] = standard_error(differences)


def several_seeds(rows: list[dict]) -> bool:
    return len({r.get("seed") for r in rows}) > 1


def write_table(rows: list[dict], out: Path) -> None:
    """results.json and .csv: one row per configuration and seed; results.md: the table (over several
    seeds, their mean ± standard deviation first, then each seed); summary.json: that mean table."""
    from . import storage

    pair_with_model_tuning(rows)
    storage.atomic_write_json(out / "results.json", rows)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=[*COLUMNS, "init", "length", "task", "ood_task", "metric", "seed", "budget"],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.atomic_write(out / "results.csv", table.getvalue().encode())
    text = markdown(rows)
    if several_seeds(rows):
        summary = summarise(rows)
        storage.atomic_write_json(out / "summary.json", summary)
        text = f"Mean ± standard deviation over seeds:\n\n{markdown(summary)}\nEach seed:\n\n{text}"
    storage.atomic_write(out / "results.md", text.encode())


def markdown(rows: list[dict]) -> str:
    shown = [r for r in rows if "skipped" not in r]
    if not shown:
        return ""
    first = shown[0]
    metric = first.get("metric", "score")
    ood = first.get("ood_task")
    head = f"| method | model | {first['task']} ({metric}) |" + (f" {ood} ({metric}, OOD) |" if ood else "")
    head += " trainable | share of model | stored per task | train time | peak memory |\n"
    head += "|---|---|---|" + ("---|" if ood else "") + "---|---|---|---|---|\n"
    lines = []
    several = several_seeds(shown)

    def score(r: dict, key: str) -> str:
        text = f"{r.get(key, float('nan')):.3f}"
        return text + (f" ± {r[key + '_sd']:.3f}" if key + "_sd" in r else "")

    for r in shown:
        method = r["method"] + (f", seed {r['seed']}" if several else "")
        cells = [method, r["model"], score(r, "in_distribution")]
        if ood:
            cells.append(score(r, "out_of_distribution"))
        cells += [f"{r['trainable']:,}", f"{100 * r['share']:.3f}%", human_bytes(r["bytes_stored"]),
                  f"{r['train_seconds']:.0f} s", human_bytes(r["peak_memory_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [f"\n{r['method']} on {r['model']}: {r['skipped']}" for r in rows if "skipped" in r]
    return head + "\n".join(lines) + "\n" + "".join(skipped) + ("\n" if skipped else "") + paired_markdown(shown)


def paired_markdown(rows: list[dict]) -> str:
    """The rows' differences from model tuning (see `pair_with_model_tuning`), as a second table."""
    paired = [r for r in rows if any(f"{name}_vs_model_tuning" in r for _, name in SIDES)]
    if not paired:
        return ""
    ood = any("out_of_distribution_vs_model_tuning" in r for r in paired)

    def cell(r: dict, name: str) -> str:
        key = f"{name}_vs_model_tuning"
        return f"{r[key]:+.3f} ({r[key + '_se']:.3f})" if key in r else "—"

    text = ("\nDifference from model tuning, example by example over the same test examples (its standard "
            "error in brackets):\n\n| method | model | in distribution |" + (" out of distribution |" if ood else "")
            + "\n|---|---|---|" + ("---|" if ood else "") + "\n")
    for r in paired:
        text += f"| {r['method']} | {r['model']} | {cell(r, 'in_distribution')} |" + (
            f" {cell(r, 'out_of_distribution')} |" if ood else "") + "\n"
    return text


def human_bytes(n: float) -> str:
    for unit in ["B", "KB", "MB", "GB"]:
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def plots(rows: list[dict], out: Path, ablation: str | None = None) -> list[Path]:
    """PNG plots: score against trainable share, in- vs out-of-distribution, and score against model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if several_seeds(rows):
        rows = summarise(rows)  # means, with their standard deviation as error bars
    shown = [r for r in rows if "skipped" not in r]
    made = []
    metric = shown[0]["metric"] if shown else "score"

    def sd(mine: list[dict], key: str) -> list[float] | None:
        return [r.get(f"{key}_sd", 0.0) for r in mine] if any(f"{key}_sd" in r for r in mine) else None

    if ablation:
        key = ablation  # the prompt setting it varies
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in sorted({r["model"] for r in shown}):
            mine = [r for r in shown if r["model"] == model]
            xs = [str(r[key]) for r in mine]
            ax.errorbar(xs, [r["in_distribution"] for r in mine], yerr=sd(mine, "in_distribution"), fmt="o-",
                        capsize=3, label=f"{model}, in-distribution")
            if any("out_of_distribution" in r for r in mine):
                ax.errorbar(xs, [r.get("out_of_distribution") for r in mine], yerr=sd(mine, "out_of_distribution"),
                            fmt="s--", capsize=3, label=f"{model}, out-of-distribution")
        ax.set_xlabel("prompt initialisation" if key == "init" else "prompt length")
        ax.set_ylabel(metric)
        ax.set_title(f"Prompt tuning: {key} ablation")
        ax.legend()
        fig.tight_layout()
        made.append(out / f"ablation-{key}.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
        return made
    for model in sorted({r["model"] for r in shown}):
        mine = [r for r in shown if r["model"] == model]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in mine:
            share = max(r["share"], 1e-7)  # prompt design trains nothing: drawn at the left edge
            ax.scatter(share, r["in_distribution"], s=50)
            ax.annotate(r["method"], (share, r["in_distribution"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable share of the model (log; prompt design at 1e-7)")
        ax.set_ylabel(f"{metric} ({mine[0]['task']}, test)")
        ax.set_title(f"Quality against trainable parameters: {model}")
        fig.tight_layout()
        made.append(out / f"score-vs-share-{slug(model)}.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
        if any("out_of_distribution" in r for r in mine):
            fig, ax = plt.subplots(figsize=(8, 4.5))
            xs = range(len(mine))
            ax.bar([x - 0.2 for x in xs], [r["in_distribution"] for r in mine], 0.4, yerr=sd(mine, "in_distribution"),
                   capsize=3, label=f"{mine[0]['task']} (in)")
            ax.bar([x + 0.2 for x in xs], [r.get("out_of_distribution", 0) for r in mine], 0.4,
                   yerr=sd(mine, "out_of_distribution"), capsize=3, label=f"{mine[0]['ood_task']} (out)")
            ax.set_xticks(list(xs), [r["method"] for r in mine], rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(metric)
            ax.set_title(f"In- and out-of-distribution: {model}")
            top = max([r["in_distribution"] for r in mine] + [r.get("out_of_distribution", 0) for r in mine])
            ax.set_ylim(0, top * 1.25)  # room above the bars for the legend
            ax.legend(loc="upper left", ncol=2, fontsize=8)
            fig.tight_layout()
            made.append(out / f"in-vs-ood-{slug(model)}.png")
            fig.savefig(made[-1], dpi=120)
            plt.close(fig)
    models = sorted({r["model"] for r in shown})
    if len(models) > 1:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for kind in ["full", "design", "prompt"]:
            points = sorted((r["model_parameters"], r["in_distribution"]) for r in shown if r["kind"] == kind)
            if points:
                ax.plot(*zip(*points, strict=True), "o-", label=label_of(kind))
        ax.set_xscale("log")
        sizes = {r["model_parameters"]: r["model"] for r in shown}
        ax.set_xticks(list(sizes), [f"{name}\n{n / 1e6:.0f} M" for n, name in sizes.items()], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("model parameters (log)")
        ax.set_ylabel(metric)
        ax.set_title("Quality against model size")
        ax.legend()
        fig.tight_layout()
        made.append(out / "score-vs-model-size.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    return made


def specs_for(models: list[str], task: str, ood: str | None, methods: list[str], budget: str, seeds: list[int],
              ablation: str | None, quantize: list[str | None] = (None,)) -> list[Spec]:
    """The configurations of a study, each over every seed (seed-minor: a configuration's seeds side by side),
    and on each base of `quantize` (None: the weights as stored), each method's bases side by side."""
    return [replace(spec, quantize=scheme, label=f"{spec.label or label_of(spec.method)}, {scheme} base")
            if scheme else spec
            for spec in _specs_for(models, task, ood, methods, budget, seeds, ablation) for scheme in quantize]


def _specs_for(models: list[str], task: str, ood: str | None, methods: list[str], budget: str, seeds: list[int],
               ablation: str | None) -> list[Spec]:
    if ablation:
        from .data import load_task
        from .models import model_family

        kind = load_task(task, seed=seeds[0]).kind
        specs = []
        for m in models:
            defaults = PromptTuning.study_defaults(kind, model_family(m))
            for value in ABLATIONS[ablation]:  # its keys are the prompt settings they vary
                shown = {**defaults, ablation: value}
                label = (f"prompt tuning, {shown['init']} init" if ablation == "init"
                         else f"prompt tuning, length {shown['length']}")
                # Settings equal to the defaults are left out, so the default configuration is the same run
                # as the plain `prompt` one (and as its counterpart in the other ablation).
                options = {k: v for k, v in shown.items() if v != defaults[k]}
                specs += [Spec(m, task, ood, "prompt", budget, seed, options, label, shown) for seed in seeds]
        return specs
    return [Spec(m, task, ood, method, budget, seed) for m in models for method in methods for seed in seeds]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="slimtune compare", description=__doc__)
    p.add_argument("--model", nargs="+", default=["smollm2-135m"], help="one or more models (several: a scaling plot)")
    p.add_argument("--task", default="rotten-tomatoes")
    p.add_argument("--ood-task", default=None, help="default: amazon-food for rotten-tomatoes, none otherwise")
    p.add_argument("--methods", nargs="+", choices=choices(), default=METHODS,
                   help=f"the configurations to compare (default: {' '.join(METHODS)})")
    p.add_argument("--budget", choices=list(BUDGETS), default="quick")
    p.add_argument("--ablation", choices=list(ABLATIONS))
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="one or more seeds (several: each configuration runs once per seed; the table gives the mean "
                   "± standard deviation, then each seed; a seed also changes the data split)")
    p.add_argument("--quantize", nargs="+", choices=["none", *SCHEMES], default=["none"],
                   help="the frozen base's linear weights as stored (none) or quantised (see slimtune train --help); "
                   "several: each configuration on each base, side by side (model tuning and DoRA are skipped on a "
                   "quantised one)")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--runs", help="the folder of per-configuration runs (default: OUT/runs); studies that share it "
                   "train the configurations they have in common once")
    p.add_argument("--fresh", action="store_true", help="run every configuration again, discarding earlier runs in --out")
    args = p.parse_args(argv)
    ood = args.ood_task or {"rotten-tomatoes": "amazon-food", "amazon-food": "rotten-tomatoes",
                            "bbc-headline-ood": None}.get(args.task)
    out = Path(args.out)
    quantize = [None if scheme == "none" else scheme for scheme in dict.fromkeys(args.quantize)]
    specs = specs_for(args.model, args.task, ood, args.methods, args.budget, args.seed, args.ablation, quantize)
    started = time.perf_counter()
    rows = run_all(specs, out, fresh=args.fresh, runs=Path(args.runs) if args.runs else None)
    made = plots(rows, out, args.ablation)
    print()
    print(markdown(rows))
    print(f"{len(rows)} runs in {time.perf_counter() - started:.0f} s; table and plots in {out}/: "
          f"results.md, results.csv, results.json, {'summary.json, ' if len(args.seed) > 1 else ''}"
          f"{', '.join(p.name for p in made)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
