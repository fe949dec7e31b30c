"""The trainer: one loop for every method, for one tuning or for many users' tunings at once.

It trains the tunings of a `Bank` (a `TunedModel` is a bank of one user): each batch may mix the
rows of many users, and each user's parameters learn from their own rows only. AdamW with linear
warm-up and decay, gradient accumulation, evaluation on a fixed validation subset every N steps
keeping the best tuning (without validation data: the final one), a JSONL log, and checkpoints
from which an interrupted run resumes and ends exactly where an uninterrupted one would: the data
order is a function of (seed, step) and the random state is saved with the optimizer.

Data-parallel: under `torchrun --nproc_per_node N` each process takes every N-th row of each
batch and only the tuning's gradients are summed across processes (gloo on CPU, NCCL on GPU), so
the result equals one process at the same global batch size; only rank 0 evaluates and writes.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import distributed as dist

from . import storage
from .bank import Bank, TunedModel
from .data import Example
from .errors import TuningError
from .formats import Format, metrics, predict
from .losses import fusable_head, linear_cross_entropy, loss_sum
from .modules import accepts
from .progress import Display, Progress
from .store import Store


@dataclass
class TrainConfig:
    steps: int | None = 200  # optimizer steps; or give epochs
    epochs: float | None = None
    batch_size: int = 8  # rows per optimizer step, over all processes and accumulation
    grad_accum: int = 1
    lr: float | None = None  # None: the method's default (`Method.learning_rate()`)
    warmup: float = 0.06  # fraction of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 50
    eval_examples: int = 200  # a fixed validation subset, the same at every evaluation
    checkpoint_every: int | None = None  # None: at every evaluation
    seed: int = 0

    def total_steps(self, examples: int) -> int:
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * examples / self.batch_size))
        if not self.steps or self.steps < 1:
            raise TuningError("give steps >= 1 or epochs")
        return self.steps


def primary_metric(fmt: Format) -> str:
    return "accuracy" if fmt.task.kind == "classification" else "rougeL"


class Trainer:
    def __init__(self, bank: Bank, fmt: Format, config: TrainConfig, out: str | os.PathLike,
                 train: list[Example], train_users: list[str], validation: list[Example],
                 validation_users: list[str], on_step: Callable[[int], None] | None = None,
                 progress: Progress | None = None):
        """`progress` shows the training steps and validations (default: a `Display` on stderr, on the
        first process only)."""
        if not train:
            raise TuningError("the training split is empty: nothing to train on")
        if config.batch_size % config.grad_accum:
            raise TuningError(f"batch_size {config.batch_size} is not a multiple of grad_accum {config.grad_accum}")
        self.bank, self.fmt, self.config, self.out = bank, fmt, config, Path(out)
        self.train, self.train_users = train, train_users
        self.validation = validation[: config.eval_examples]
        self.validation_users = validation_users[: config.eval_examples]
        self.on_step = on_step
        self.users = sorted(set(train_users))
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.progress = progress or (Display() if self.rank == 0 else Progress())
        self.device = next(bank.model.parameters()).device
        self.params = self._trainable()
        self._keeps_logits = fmt.style != "head" and accepts(bank.model, "logits_to_keep")
        self._head = fusable_head(bank.model) if fmt.style != "head" else None
        self.lr = config.lr if config.lr is not None else bank.method(self.users[0]).learning_rate()
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=self.lr, weight_decay=config.weight_decay)
        self.steps = config.total_steps(len(train))
        warm = max(1, int(config.warmup * self.steps))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / warm, max(0.0, (self.steps - s) / max(1, self.steps - warm)))
        )
        self.step = 0
        self.train_time = 0.0  # seconds in training steps, over every resumed part of the run
        self.best: float | None = None
        self.best_step: int | None = None
        self._orders: dict[int, list[int]] = {}

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        wanted = {id(p) for user in self.users for p in self.bank.user_parameters(user)}
        named = [(n, p) for n, p in self.bank.named_parameters() if id(p) in wanted]
        for _, p in named:
            p.requires_grad_(True)
        return named

    # --- data order: a function of (seed, step) alone, so a resumed run sees the same batches --

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.train), generator=g).tolist()}
        return self._orders[epoch]

    def batch_rows(self, step: int) -> list[int]:
        n, size = len(self.train), self.config.batch_size
        return [self._order((step * size + j) // n)[(step * size + j) % n] for j in range(size)]

    # --- the loop ------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict:
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_checkpoint()  # restores the random state too
        else:
            torch.manual_seed(self.config.seed)
            if self.rank == 0:
                (self.out / "log.jsonl").write_text("")
        self.progress.start("training", self.steps, "step", done=self.step)
        last_metric, loss = None, None
        while self.step < self.steps:
            t0 = time.perf_counter()
            loss = self._train_step(self.step)
            self.train_time += time.perf_counter() - t0
            self.step += 1
            record = {"step": self.step, "loss": loss, "lr": self.schedule.get_last_lr()[0]}
            if self.step % self.config.eval_every == 0 or self.step == self.steps:
                last_metric = self._evaluate()
                record["validation"] = last_metric
            self._log(record)
            self.progress.advance(1, loss=loss, **({primary_metric(self.fmt): self._primary(last_metric)}
                                                   if last_metric else {}))
            every = self.config.checkpoint_every or self.config.eval_every
            if self.step % every == 0 or self.step == self.steps:
                self._save_checkpoint()
            if self.on_step is not None:
                self.on_step(self.step)
        self.progress.end(**({"loss": loss} if loss is not None else {}))
        if not self.validation and self.rank == 0:  # nothing to choose a best step by: keep the final tuning
            self.save_tunings(self.out)
        summary = {
            "steps": self.steps, "lr": self.lr, "best_step": self.best_step,
            f"best_validation_{primary_metric(self.fmt)}": self.best,
            "final_validation": last_metric, "train_seconds": round(self.train_time, 2),
            "wall_seconds": round(time.perf_counter() - started, 2), "peak_memory_bytes": peak_memory(self.device),
            "processes": self.world, "config": asdict(self.config),
        }
        if self.rank == 0:
            storage.atomic_write_json(self.out / "summary.json", summary)
        return summary

    def _train_step(self, step: int) -> float:
        rows = self.batch_rows(step)
        micro = len(rows) // self.config.grad_accum
        chunks = [rows[i : i + micro] for i in range(0, len(rows), micro)]
        # Normalise by the loss terms of the whole step, on every process alike.
        whole = [self.fmt.batch([self.train[i] for i in chunk]) for chunk in chunks]
        total = sum(int(batch["weights"]) for batch in whole)
        self.bank.train()
        loss_value = 0.0
        for chunk, batch in zip(chunks, whole, strict=True):
            mine = chunk[self.rank :: self.world]
            if not mine:
                continue
            # One process: the batch tokenised for the count is the one to run. Several: this process's rows.
            mine_batch = batch if self.world == 1 else self.fmt.batch([self.train[i] for i in mine])
            inputs = {k: v.to(self.device) for k, v in mine_batch.items()}
            labels, _ = inputs.pop("labels"), inputs.pop("weights")
            keep = self._logits_to_keep(labels)
            if keep:  # the loss needs logits only where the (right-aligned) targets are
                inputs["logits_to_keep"] = keep
                labels = labels[:, -keep:]
            users = [self.train_users[i] for i in mine]
            loss = summed_loss(self.bank, users, inputs, labels, self._head) / max(1, total)
            loss.backward()
            loss_value += loss.item()
        grads = [p for _, p in self.params]
        if self.world > 1:
            for p in grads:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            value = torch.tensor(loss_value, device=self.device)
            dist.all_reduce(value)
            loss_value = value.item()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(grads, self.config.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def _logits_to_keep(self, labels: torch.Tensor) -> int:
        """With left padding the targets end every row: the model need only project the last columns
        onto the vocabulary (and one before, whose logits predict the first target token)."""
        if labels.dim() != 2 or not self._keeps_logits:
            return 0
        columns = (labels != -100).any(0).nonzero()
        return 0 if len(columns) == 0 else labels.shape[1] - int(columns[0]) + 1

    def _primary(self, result: dict) -> float:
        return result[primary_metric(self.fmt)]

    def _evaluate(self) -> dict | None:
        if self.rank != 0 or not self.validation:
            self._barrier()
            return None
        self.bank.eval()
        self.progress.start(f"validation at step {self.step}", len(self.validation), "example")
        predictions = predict_with_progress(self.bank, self.fmt, self.validation, self.validation_users, self.progress)
        result = metrics(self.fmt.task, self.validation, predictions)
        shown = {k: v for k, v in result.items() if k in ("accuracy", "macro_f1", "rougeL", "bleu")}
        if self.fmt.task.kind == "classification":  # how often each label was answered: one alone is a failed run
            result["predicted_labels"] = {label: predictions.count(label) for label in self.fmt.task.labels
                                          if label in predictions}
        self.progress.end(**shown)
        if self.best is None or self._primary(result) > self.best:
            self.best, self.best_step = self._primary(result), self.step
            self.save_tunings(self.out)
        self._barrier()
        return result

    def save_tunings(self, out: Path) -> None:
        """The best tuning: out/tuning for one user; for many, a `Store` at out/store (one entry per user)."""
        task = self.fmt.describe()
        if self.users == ["default"]:
            self.bank.save("default", out / "tuning", task=task)
        else:
            store = Store(out / "store", self.bank.model)
            for user in self.users:
                store.add(user, TunedModel(self.bank, user), task=task, replace=True)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # --- checkpoints -----------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        if self.rank != 0:
            self._barrier()
            return
        folder = self.out / "checkpoint"
        tensors = {name: p.detach() for name, p in self.params}
        state = {
            "step": self.step, "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "best": self.best, "best_step": self.best_step, "train_seconds": self.train_time,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        storage.atomic_write(folder / "trainable.safetensors", storage.encode(tensors))
        storage.atomic_write(folder / "state.pt", buffer.getvalue())  # written last: the commit point
        self._barrier()

    def _load_checkpoint(self) -> None:
        folder = self.out / "checkpoint"
        if not (folder / "state.pt").is_file():
            raise TuningError(f"nothing to resume: no checkpoint in {folder}; start without --resume")
        state = torch.load(folder / "state.pt", weights_only=False)
        from safetensors.torch import load_file

        tensors = load_file(folder / "trainable.safetensors")
        names = dict(self.params)
        if set(tensors) != set(names):
            raise TuningError(f"the checkpoint in {folder} holds other parameters than this run trains; "
                              "was it made with other settings?")
        with torch.no_grad():
            for name, p in names.items():
                p.copy_(tensors[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.best, self.best_step = state["step"], state["best"], state["best_step"]
        self.train_time = state["train_seconds"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if self.rank == 0:  # keep the log up to the checkpoint: the steps after it are run again
            log = self.out / "log.jsonl"
            kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            storage.atomic_write(log, "".join(line + "\n" for line in kept).encode())


def predict_with_progress(bank: Bank, fmt: Format, examples: list[Example], users: list[str | None],
                          progress: Progress, batch_size: int = 16) -> list[str]:
    """`formats.predict`, advancing `progress` (a phase the caller starts and ends) after every batch.

    The examples are taken in predict's own order (by length) and handed to it a batch at a time, so the
    batches, and the answers, are the ones it would make in one call."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text) + len(examples[i].text_pair or ""))
    answers = [""] * len(examples)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        for i, answer in zip(rows, predict(bank, fmt, [examples[i] for i in rows], [users[i] for i in rows], batch_size),
                             strict=True):
            answers[i] = answer
        progress.advance(len(rows))
    return answers


def summed_loss(bank: Bank, users: list[str], inputs: dict, labels: torch.Tensor, head: torch.nn.Linear | None):
    """A batch's summed loss: through `linear_cross_entropy` when the model's output projection is
    frozen and plain (`head`), never holding the logits; else from the logits."""
    if head is None:
        return loss_sum(bank(users=users, **inputs).logits, labels)
    keep = inputs.pop("logits_to_keep", 0)
    hidden = bank(users=users, hidden_states_only=True, **inputs).last_hidden_state
    return linear_cross_entropy(hidden[:, -keep:] if keep else hidden, head, labels)


def peak_memory(device: torch.device) -> int:
    """Peak memory of this process in bytes: the accelerator's when there is one, else resident RAM."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
