"""The `slimtune` command: train a tuning on a task, evaluate it, and the demo."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from . import methods as method_configs
from . import storage
from .bank import Bank, TunedModel
from .data import DataError, Task, load_task
from .errors import TuningError
from .formats import Format, label_translation, metrics, write_predictions
from .progress import Display
from .quantize import SCHEMES, check_method, parameter_count
from .report import parameter_report
from .store import Store
from .train import TrainConfig, Trainer, predict_with_progress


def method_from_args(args: argparse.Namespace, task: Task | None) -> method_configs.Method:
    """The config of `--method` built from the parsed options, by the method itself (`Method.from_cli`)."""
    return method_configs.METHODS[args.method].from_cli(args, task)


def open_model(name: str, task: Task, quiet: bool = True, quantize: str | None = None):
    """The model and tokenizer for a task: encoders classify with a new head, decoders by label words.
    `quiet`: without transformers' loading output; `quantize`: its linear weights quantised (see `load_model`)."""
    from .models import load_model, model_family

    if task.kind == "classification" and model_family(name) == "encoder":
        return load_model(name, "classification", num_labels=len(task.labels), quiet=quiet, quantize=quantize)
    return load_model(name, task.kind, quiet=quiet, quantize=quantize)


def say(line: str) -> None:
    """slimtune's own words about a run, on stderr: stdout holds the run's result alone (JSON)."""
    print(f"slimtune: {line}", file=sys.stderr, flush=True)


def head_note(model, task: Task, trained: bool) -> str | None:
    """What a newcomer should know about the model's classification head, when it is not the checkpoint's
    own: it starts random and is trained with the tuning (`trained`), or comes from a run's tuning."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return None
    if any(a.endswith("ForSequenceClassification") for a in (model.config.architectures or [])):
        return None  # the checkpoint brought its own head
    labels = f"{len(task.labels)} labels ({', '.join(task.labels)})"
    return f"new classification head: {labels}, " + ("trained with the tuning" if trained else "read from the run's tuning")


def one_class_warning(summary: dict) -> str | None:
    """A warning when the final validation answered one label for every example: the run has learnt
    nothing but that label's prior."""
    answered = (summary.get("final_validation") or {}).get("predicted_labels") or {}
    if len(answered) != 1:
        return None
    (label,) = answered
    return (f"every validation example got label {label!r}: train longer or raise --lr (this run: "
            f"{summary['steps']} steps at lr {summary['lr']:g})")


def task_with_users(args: argparse.Namespace) -> Task:
    options = {"group_column": args.user_column} if args.user_column else {}
    return load_task(args.task, seed=args.seed, **options)


def cmd_train(args: argparse.Namespace) -> int:
    task = task_with_users(args)
    model, tokenizer = open_model(args.model, task, quiet=not args.verbose, quantize=args.quantize)
    distributed = _init_distributed()
    if distributed:
        model.to(_local_device())
    elif torch.cuda.is_available():
        model.cuda()
    torch.manual_seed(args.seed)
    method = method_from_args(args, task)
    check_method(method, model)
    bank = Bank(model, tokenizer)
    if args.user_column:
        users_of = [e.group for e in task.train]
        validation_users = [e.group for e in task.validation]
        for user in sorted(set(users_of)):
            bank.add(user, method)
    else:
        bank.add("default", method)
        users_of, validation_users = ["default"] * len(task.train), ["default"] * len(task.validation)
    fmt = Format.for_model(task, tokenizer, model, max_length=args.max_length)
    config = TrainConfig(
        steps=None if args.epochs else args.steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, eval_every=args.eval_every, eval_examples=args.eval_examples,
        seed=args.seed, weight_decay=args.weight_decay,
    )
    out = Path(args.out)
    record = {
        "model": args.model, "quantize": args.quantize, "task": args.task, "method": method.to_dict(), "style": fmt.style,
        "template": fmt.template, "max_length": args.max_length, "seed": args.seed, "user_column": args.user_column,
        "command": "slimtune " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    if not distributed or torch.distributed.get_rank() == 0:
        storage.atomic_write_json(out / "run.json", record)
    first = not distributed or torch.distributed.get_rank() == 0
    note = head_note(model, task, trained=True)
    if note and first:
        say(note)
    trainer = Trainer(bank, fmt, config, out, task.train, users_of, task.validation, validation_users)
    summary = trainer.run(resume=args.resume)
    if first:
        if not args.user_column:
            tuned = TunedModel(bank, "default")
            report = parameter_report(tuned)
            total = parameter_count(tuned)  # a quantised base's weights counted as the weights they stand for
            summary["parameters"] = {"trainable": report.trainable, "total": total, "share": report.trainable / total,
                                     "bytes_stored": report.bytes_stored}
            storage.atomic_write_json(out / "summary.json", summary)
        print(json.dumps(summary, indent=2), flush=True)
        warning = one_class_warning(summary)
        if warning:
            say(f"warning: {warning}")
    return 0


def _init_distributed() -> bool:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    return True


def _local_device() -> torch.device:
    import os

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def run_record(run: Path) -> dict:
    """How a run was made: the run.json of a `slimtune train` run, or one read from the spec.json of a
    trained configuration of `slimtune compare` (its model, task, seed and its budget's sequence length)."""
    if (run / "run.json").is_file():
        return json.loads((run / "run.json").read_text())
    if (run / "spec.json").is_file():
        from .compare import BUDGETS

        spec = json.loads((run / "spec.json").read_text())
        if not (run / "tuning").is_dir():
            raise TuningError(f"'{run}' is a {spec['method']} configuration of slimtune compare without a trained "
                              "tuning: prompt design trains nothing, and an unfinished training has no tuning/ yet")
        return {"model": spec["model"], "quantize": spec.get("quantize"), "task": spec["task"], "seed": spec["seed"],
                "max_length": BUDGETS[spec["budget"]]["max_length"]}
    raise TuningError(f"'{run}' is not a training run: it has no run.json (made by slimtune train --out) "
                      "and no spec.json (a configuration of slimtune compare, in <out>/runs/)")


def cmd_eval(args: argparse.Namespace) -> int:
    run = Path(args.run)
    record = run_record(run)
    task = load_task(args.task or record["task"], seed=record["seed"],
                     **({"group_column": record["user_column"]} if record.get("user_column") else {}))
    trained_on = load_task(record["task"], seed=record["seed"]) if (args.task and args.task != record["task"]) else task
    model, tokenizer = open_model(record["model"], trained_on, quiet=not args.verbose, quantize=record.get("quantize"))
    note = head_note(model, trained_on, trained=False)
    if note:
        say(note)
    if torch.cuda.is_available():
        model.cuda()
    bank = Bank(model, tokenizer)
    examples = task.splits[args.split][: args.examples] if args.examples else task.splits[args.split]
    if record.get("user_column"):
        store = Store(run / "store", model)
        for name in store.names():
            bank.add(name, store.path_of(name))
        users = [e.group for e in examples]
    else:
        bank.add("default", run / "tuning")
        users = ["default"] * len(examples)
    # The run's own template on its own task; another task is read through that task's template.
    same_task = task.name == trained_on.name
    max_length = args.max_length or record["max_length"]
    fmt = Format.for_model(task, tokenizer, model, max_length=max_length,
                           **({"template": record["template"]} if same_task and "template" in record else {}))
    if fmt.style == "head" and not same_task:  # the head answers in the labels it was trained on
        translation = label_translation(trained_on, task)
        fmt = Format(trained_on, tokenizer, "head", max_length=max_length)
    progress = Display()
    progress.start(f"evaluating {task.name} {args.split}", len(examples), "example")
    predictions = predict_with_progress(bank, fmt, examples, users, progress)
    if fmt.style == "head" and not same_task:
        predictions = [translation[p] for p in predictions]
    scores = metrics(task, examples, predictions)
    progress.end(**{k: v for k, v in scores.items() if not k.endswith("_se")})
    result = {"run": str(run), "task": task.name, "split": args.split, "examples": len(examples),
              "max_length": max_length, **scores}
    answers = run / "eval" / f"{task.name}-{args.split}.predictions.jsonl"
    write_predictions(answers, examples, predictions)
    result["predictions"] = str(answers)
    storage.atomic_write_json(run / "eval" / f"{task.name}-{args.split}.json", result)
    print(json.dumps(result, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving.http.app import ServerOptions, serve  # fastapi and uvicorn only when serving

    options = ServerOptions(model=args.model, store=args.store, max_resident=args.max_resident, max_batch=args.max_batch,
                            max_tunings_per_key=args.max_tunings_per_key, max_bytes_per_key=args.max_bytes_per_key,
                            max_requests_per_key=args.max_requests_per_key, compile=args.compile, quantize=args.quantize)
    serve(options, host=args.host, port=args.port, admin_key_file=args.admin_key_file, replicas=args.replicas,
          ray_address=args.ray_address)
    return 0


class MethodOptions:
    """The "method options" group of a command, into which each method adds its own (`Method.cli_options`).
    An option several methods take (`--length` of prompt and prefix tuning, LoRA's options that DoRA inherits)
    is added once, its help saying what it is to each (`prompt: soft prompt tokens ...; prefix: ...`)."""

    def __init__(self, group: argparse._ArgumentGroup):
        self.group = group
        self.kind = ""  # the method adding options now
        self._added: dict[str, tuple[argparse.Action, dict, list[tuple[list[str], str]]]] = {}

    def add_argument(self, flag: str, **settings) -> None:
        text = settings.pop("help", "")
        if flag not in self._added:
            self._added[flag] = (self.group.add_argument(flag, **settings), settings, [])
        action, first, helps = self._added[flag]
        if settings != first:
            raise ValueError(f"{flag} of method {self.kind!r} is declared as {settings}, another method's as {first}: "
                             "methods that share an option must agree on everything but its help")
        same = next((kinds for kinds, t in helps if t == text), None)
        if same is not None:
            same.append(self.kind)
        else:
            helps.append(([self.kind], text))
        action.help = "; ".join(f"{', '.join(kinds)}: {t}" if t else ", ".join(kinds) for kinds, t in helps)


def add_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=list(method_configs.METHODS), help="which tuning method")
    options = MethodOptions(p.add_argument_group("method options"))
    for kind, method in method_configs.METHODS.items():
        options.kind = kind
        method.cli_options(options)


def add_quantize_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=list(SCHEMES),
                   help="store the frozen base's linear weights quantised: " + ", ".join(
                       f"{name} ({scheme.description})" for name, scheme in SCHEMES.items()) + "; needs slimtune[quant]")


def default_lrs() -> str:
    """Each method's default learning rate, for the help of --lr."""
    shown = []
    for kind, method in method_configs.METHODS.items():
        rate = method().learning_rate()  # its default config's; a rate may depend on the settings (prefix's MLP)
        shown.append(f"{kind} {rate:g}" + (f" ({method.default_lr:g} with other settings)" if rate != method.default_lr else ""))
    return ", ".join(shown)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="slimtune", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("compare", help="every method side by side on one task (see: slimtune compare --help)")

    train = sub.add_parser("train", help="train a tuning on a task")
    train.add_argument("--model", default="smollm2-135m",
                       help="smollm2-135m, gemma3-270m, minilm-l6, a local HF folder or a hub id")
    add_method_options(train)
    train.add_argument("--task", required=True, help="a built-in task or a .csv/.jsonl file")
    train.add_argument("--out", required=True, help="the run's folder")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--epochs", type=float)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--lr", type=float, help=f"learning rate (default per method: {default_lrs()})")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--eval-every", type=int, default=50)
    train.add_argument("--eval-examples", type=int, default=200)
    train.add_argument("--max-length", type=int, default=128,
                       help="tokens per input; a longer text keeps its start (and the prompt its cue)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    train.add_argument("--user-column", help="train one tuning per value of this column of a data file")
    add_quantize_option(train)
    train.add_argument("--verbose", action="store_true", help="also show transformers' own loading output")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a trained run on a task")
    ev.add_argument("--run", required=True)
    ev.add_argument("--task", help="default: the task it was trained on")
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ev.add_argument("--examples", type=int, help="evaluate only the first N examples")
    ev.add_argument("--max-length", type=int, help="tokens per input (default: the run's); a longer text keeps its "
                    "start (and the prompt its cue)")
    ev.add_argument("--verbose", action="store_true", help="also show transformers' own loading output")
    ev.set_defaults(func=cmd_eval)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over the store's tunings, with per-user keys")
    serve.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m, a local HF folder or a hub id")
    serve.add_argument("--store", default="slimtune-store", help="the store folder (tunings and keys.json)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--admin-key-file", help="a file holding the admin key (default: $SLIMTUNE_ADMIN_KEY)")
    serve.add_argument("--max-resident", type=int, default=64, help="tunings held in memory at once")
    serve.add_argument("--max-batch", type=int, default=32, help="generations per decoding step")
    add_quantize_option(serve)
    serve.add_argument("--compile", action="store_true",
                       help="decoding steps through torch.compile (one graph per batch shape; minutes to compile each "
                            "on a CPU, then no Python per hook; CUDA graphs on a GPU)")
    serve.add_argument("--max-tunings-per-key", type=int, default=100, help="tunings one key may keep in the store")
    serve.add_argument("--max-bytes-per-key", type=int, default=2 * 2**30,
                       help="bytes of tensors one key may keep in the store (default 2 GiB)")
    serve.add_argument("--max-requests-per-key", type=int, default=64,
                       help="requests one key may have in flight at once (each prompt counts; 429 beyond)")
    serve.add_argument("--replicas", type=int, default=0,
                       help="serve as this many engine replicas on Ray Serve, sharing the store and routed by tuning "
                            "(needs: pip install 'slimtune[ray]'); 0, the default, serves in this process")
    serve.add_argument("--ray-address", help="with --replicas: the Ray cluster to join (default: a local Ray instance)")
    serve.set_defaults(func=cmd_serve)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # its own parser: the options of the comparison study
        from .compare import main as compare_main

        try:
            return compare_main(argv[1:])
        except (TuningError, DataError) as err:
            print(f"slimtune: error: {err}", file=sys.stderr)
            return 2
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (TuningError, DataError) as err:
        print(f"slimtune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
