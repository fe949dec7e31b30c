"""Trains a tiny Llama's tuning with transformers' Trainer, for `accelerate launch` in test_trainer.py:
`python trainer_launch.py OUT PER_DEVICE_BATCH [bank]` saves it to OUT with `save_model()`: a prefix tuning, or with
`bank`, a TunedBank of three users (alice's and bob's rows, shuffled by the Trainer's sampler, and carol with no rows
at all, whose parameters get no gradient in any process)."""

import sys

import torch
from transformers import Trainer, TrainingArguments

import slimtune

from conftest import build


def tuning(bank: bool = False):
    """What the run trains, as it starts: the same in every process and in the test that compares."""
    torch.manual_seed(0)
    if not bank:
        return slimtune.attach(build("llama"), slimtune.PrefixTuning(length=3))
    shared = slimtune.Bank(build("llama"))
    shared.add("alice", slimtune.LoRA(rank=4))
    shared.add("bob", slimtune.PrefixTuning(length=3))
    shared.add("carol", slimtune.LoRA(rank=2))
    return slimtune.TunedBank(shared)


def main(out: str, per_device: int, bank: bool = False) -> None:
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 96, (32, 8), generator=g).tolist()
    columns = {"input_ids": ids, "attention_mask": [[1] * 8] * 32, "labels": ids}
    tuned = tuning(bank)
    if bank:
        columns["user"] = tuned.user_ids(["alice", "bob"] * 16)
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=per_device, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=tuned, args=args, train_dataset=Dataset.from_dict(columns))
    trainer.train()
    trainer.save_model(out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), bank=sys.argv[3:] == ["bank"])
