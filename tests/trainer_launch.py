"""Trains a tiny Llama's prefix tuning with transformers' Trainer, for `accelerate launch` in test_trainer.py:
`python trainer_launch.py OUT PER_DEVICE_BATCH` saves the tuning to OUT with `save_model()`."""

import sys

import torch
from transformers import Trainer, TrainingArguments

import slimtune

from conftest import build


def main(out: str, per_device: int) -> None:
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 96, (32, 8), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 8] * 32, "labels": ids})
    torch.manual_seed(0)
    tuned = slimtune.attach(build("llama"), slimtune.PrefixTuning(length=3))
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=per_device, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=tuned, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
