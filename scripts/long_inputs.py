"""Which part of a long review to read: the measurement behind "Long inputs" in docs/results.md.

Writes the long-review set (the Amazon fine-food test reviews longer than 128 MiniLM tokens, labelled
with their label words, so a head trained on amazon-food reads them as another task with the same
labels), then scores a classification-head run on it at several input lengths, reading each review's
start (what slimtune does, and `slimtune eval --max-length N` measures), its end, or both halves
(the first and last N/2 tokens).

    python scripts/long_inputs.py --run runs/amazon-lora48 --out runs/amazon-long.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

import slimtune
from slimtune.data import Example, Task, load_task
from slimtune.formats import metrics
from slimtune.models import load_model

KEEPS = ("start", "end", "both ends")


def long_reviews(tokenizer, longer_than: int) -> tuple[Task, list[Example]]:
    task = load_task("amazon-food", seed=0)
    return task, [e for e in task.test if len(tokenizer(e.text)["input_ids"]) > longer_than]


def window(ids: list[int], length: int, keep: str, cls: int, sep: int) -> list[int]:
    room = length - 2  # [CLS] ... [SEP]
    if len(ids) > room:
        ids = {"start": ids[:room], "end": ids[-room:], "both ends": ids[: room // 2] + ids[len(ids) - (room - room // 2):]}[keep]
    return [cls, *ids, sep]


@torch.no_grad()
def predict(tuned, tokenizer, task, examples, length: int, keep: str, batch_size: int = 16) -> list[str]:
    answers = []
    for start in range(0, len(examples), batch_size):
        rows = [window(tokenizer(e.text, add_special_tokens=False)["input_ids"], length, keep,
                       tokenizer.cls_token_id, tokenizer.sep_token_id) for e in examples[start : start + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        logits = tuned(input_ids=ids, attention_mask=mask).logits
        answers += [task.labels[i] for i in logits.argmax(-1).tolist()]
    return answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a slimtune train run of minilm-l6 on amazon-food")
    p.add_argument("--out", required=True, help="where to write the long-review set (CSV)")
    p.add_argument("--lengths", type=int, nargs="+", default=[48, 128, 256, 512])
    p.add_argument("--longer-than", type=int, default=128)
    args = p.parse_args()
    run = json.loads((Path(args.run) / "run.json").read_text())
    model, tokenizer = load_model(run["model"], "classification", num_labels=2, quiet=True)
    task, examples = long_reviews(tokenizer, args.longer_than)
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([e.text, task.label_words[e.label]] for e in examples)
    tuned = slimtune.load(model, Path(args.run) / "tuning").eval()
    print(f"{len(examples)} reviews longer than {args.longer_than} tokens; the run was trained on {run['max_length']}")
    print("| tokens read | " + " | ".join(KEEPS) + " |\n|---|" + "---|" * len(KEEPS))
    for length in args.lengths:
        cells = []
        for keep in KEEPS:
            score = metrics(task, examples, predict(tuned, tokenizer, task, examples, length, keep))
            cells.append(f"{score['accuracy']:.3f} ± {score['accuracy_se']:.3f}")
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
