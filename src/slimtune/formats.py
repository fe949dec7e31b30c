"""How a task's examples become model inputs, losses and predictions.

Three formats, one per kind of model and task:

- **verbalizer** (classification through the language model's own head): the example is put in a
  template ending in a cue (`"...\\nSentiment:"`), and each label is a word the model could say
  next (`" positive"`). Training is language modelling on the label word; prediction picks the
  label whose word the model finds most likely (rank classification). Works on decoders with no
  new head, and for prompt design with no training at all.
- **head** (classification through a sequence-classification head, e.g. MiniLM): the text (and
  text pair) goes in as is, the label as a class index.
- **generation**: input then target; the loss is on the target tokens only; prediction is greedy
  decoding.

Every batch carries `weights`: the number of loss terms (target tokens, or examples) it holds, so
a step's loss is a sum divided by the terms in the whole step — exact under gradient accumulation
and across data-parallel processes, whatever the padding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Example, Task
from .errors import TuningError
from .modules import accepts
from .storage import atomic_write

# Templates: {text} and {text_pair} are the example's fields; the cue ends the prompt.
TEMPLATES = {
    "rotten-tomatoes": "Review: {text}\nSentiment:",
    "amazon-food": "Review: {text}\nSentiment:",
    "bbc-topic": "Article: {text}\nTopic:",
    "snli": "Premise: {text}\nHypothesis: {text_pair}\nRelation:",
    "bbc-headline": "Article: {text}\nHeadline:",
    "bbc-headline-ood": "Article: {text}\nHeadline:",
}
DEFAULT_CLASSIFICATION = "Text: {text}\nLabel:"
DEFAULT_PAIR = "Text: {text}\nSecond text: {text_pair}\nLabel:"
DEFAULT_GENERATION = "Input: {text}\nOutput:"


def template_for(task: Task) -> str:
    if task.name in TEMPLATES:
        return TEMPLATES[task.name]
    if task.kind == "generation":
        return DEFAULT_GENERATION
    return DEFAULT_PAIR if any(e.text_pair for e in task.train[:50]) else DEFAULT_CLASSIFICATION


@dataclass
class Format:
    """Turns examples of one task into batches for one model."""

    task: Task
    tokenizer: object
    style: str  # "verbalizer", "head" or "generation"
    max_length: int = 128
    max_new_tokens: int = 24
    template: str = ""

    def __post_init__(self):
        self.template = self.template or template_for(self.task)
        if self.style == "verbalizer":
            self.label_ids = [self._encode(" " + self.task.label_words[label]) for label in self.task.labels]
            if any(not ids for ids in self.label_ids):
                raise TuningError("a label word encodes to no tokens")

    @classmethod
    def for_model(cls, task: Task, tokenizer, model, **options) -> Format:
        if task.kind == "generation":
            return cls(task, tokenizer, "generation", **options)
        has_head = type(model).__name__.endswith("ForSequenceClassification")
        return cls(task, tokenizer, "head" if has_head else "verbalizer", **options)

    def describe(self) -> dict:
        """What a saved tuning records about its task, so a server can classify with it."""
        out = {"name": self.task.name, "kind": self.task.kind, "style": self.style, "template": self.template,
               "max_length": self.max_length}
        if self.task.kind == "classification":
            out.update(labels=list(self.task.labels), label_words=dict(self.task.label_words))
        return out

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, example: Example) -> str:
        return self.template.format(text=example.text, text_pair=example.text_pair or "")

    def prompt_ids(self, example: Example, room: int = 0) -> list[int]:
        """The prompt's tokens, the example's text cut so that `room` tokens still fit after it."""
        ids = self._encode(self.prompt(example))
        budget = self.max_length - room
        if len(ids) > budget:  # cut the middle of the text, keep the template's cue at the end
            cue = self._encode(self.template.split("{text}")[-1].format(text_pair=example.text_pair or ""))
            ids = ids[: max(1, budget - len(cue))] + cue
            ids = ids[-budget:]
        return ids

    def _target_ids(self, example: Example) -> list[int]:
        if self.style == "verbalizer":
            return self.label_ids[self.task.labels.index(example.label)]
        ids = self._encode(" " + example.target.strip())[: self.max_new_tokens]
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    def batch(self, examples: list[Example], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Inputs with `labels` (loss targets, -100 elsewhere) and `weights` (loss terms in the batch)."""
        if self.style == "head":
            labels = torch.tensor([self.task.labels.index(e.label) for e in examples])
            out = {**self.head_inputs(examples, device), "labels": labels, "weights": torch.tensor(len(examples))}
            return {k: v.to(device) for k, v in out.items()}
        rows, targets = [], []
        for e in examples:
            target = self._target_ids(e)
            prompt = self.prompt_ids(e, room=len(target))
            rows.append(prompt + target)
            targets.append([-100] * len(prompt) + target)
        return self._pad(rows, targets, device)

    def head_inputs(self, examples: list[Example], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The tokenised texts (and text pairs) for a classification head; their labels may be of another task."""
        enc = self.tokenizer(
            [e.text for e in examples],
            [e.text_pair for e in examples] if examples[0].text_pair is not None else None,
            truncation=True, max_length=self.max_length, padding=True, return_tensors="pt",
        )
        return {k: v.to(device) for k, v in enc.items()}

    def _pad(self, rows: list[list[int]], targets: list[list[int]], device) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        for b, (row, target) in enumerate(zip(rows, targets, strict=True)):
            cols = slice(width - len(row), width)  # left padding: decoders continue on the right
            ids[b, cols] = torch.tensor(row)
            mask[b, cols] = 1
            labels[b, cols] = torch.tensor(target)
        weights = (labels[:, 1:] != -100).sum()
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}
        return {k: v.to(device) for k, v in out.items()}


def label_translation(trained_on: Task, task: Task) -> dict[str, str]:
    """How a classification head trained on one task's labels answers on another task: through the
    label words they share (fresh -> positive -> great)."""
    by_word = {task.label_words[label]: label for label in task.labels}
    translation = {}
    for label in trained_on.labels:
        word = trained_on.label_words[label]
        if word not in by_word:
            raise TuningError(f"the label {label!r} ({word!r}) of {trained_on.name} has no counterpart among "
                              f"{task.name}'s label words {sorted(by_word)}")
        translation[label] = by_word[word]
    return translation


@torch.no_grad()
def predict(bank, fmt: Format, examples: list[Example], users: list[str | None], batch_size: int = 16) -> list[str]:
    """Predicted labels (classification) or texts (generation), example i under the tuning of
    users[i] (None: the base model), many users mixed in each batch."""
    # Batches of similar length waste little on padding; the answers come back in the given order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text) + len(examples[i].text_pair or ""))
    answers = _predict_in_order(bank, fmt, [examples[i] for i in order], [users[i] for i in order], batch_size)
    out = [""] * len(examples)
    for i, answer in zip(order, answers, strict=True):
        out[i] = answer
    return out


def _predict_in_order(run, fmt: Format, examples: list[Example], users: list[str | None], batch_size: int) -> list[str]:
    device = next(run.parameters()).device
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        who = users[start : start + batch_size]
        if fmt.style == "head":
            logits = run(users=who, **fmt.head_inputs(chunk, device)).logits
            out.extend(fmt.task.labels[i] for i in logits.argmax(-1).tolist())
        elif fmt.style == "verbalizer":
            out.extend(_rank_labels(run, fmt, chunk, who, device))
        else:
            rows = [fmt.prompt_ids(e, room=fmt.max_new_tokens) for e in chunk]
            inputs = fmt._pad(rows, rows, device)
            generated = run.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], users=who,
                max_new_tokens=fmt.max_new_tokens, do_sample=False, pad_token_id=fmt.tokenizer.pad_token_id,
            )
            new = generated[:, inputs["input_ids"].shape[1] :]
            out.extend(t.strip().split("\n")[0] for t in fmt.tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


def _rank_labels(run, fmt: Format, chunk: list[Example], who, device) -> list[str]:
    """The label whose word is most likely after the prompt. When the label words start with
    distinct tokens one forward pass per example decides; otherwise each word is scored whole."""
    firsts = [ids[0] for ids in fmt.label_ids]
    prompts = [fmt.prompt_ids(e, room=max(len(ids) for ids in fmt.label_ids)) for e in chunk]
    if len(set(firsts)) == len(firsts):
        inputs = fmt._pad(prompts, prompts, device)
        last = {"logits_to_keep": 1} if accepts(run.model, "logits_to_keep") else {}  # only the next-token logits
        logits = run(users=who, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **last).logits[:, -1]
        choice = logits[:, firsts].argmax(-1)
        return [fmt.task.labels[i] for i in choice.tolist()]
    scores = []
    for ids in fmt.label_ids:
        rows = [p + ids for p in prompts]
        targets = [[-100] * len(p) + ids for p in prompts]
        inputs = fmt._pad(rows, targets, device)
        logits = run(users=who, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        labels = inputs["labels"][:, 1:]
        token = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
        scores.append(token.sum(-1))
    return [fmt.task.labels[i] for i in torch.stack(scores, -1).argmax(-1).tolist()]


def write_predictions(path: Path, examples: list[Example], predictions: list[str]) -> None:
    """One JSON line per example (its input, the reference answer and the prediction), written atomically,
    so that a score can be read back to the answers behind it."""
    lines = []
    for e, p in zip(examples, predictions, strict=True):
        record = {"text": e.text, **({"text_pair": e.text_pair} if e.text_pair is not None else {}),
                  **({"group": e.group} if e.group is not None else {}),
                  "reference": e.label if e.label is not None else e.target, "prediction": p}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    atomic_write(Path(path), "".join(lines).encode())


def example_scores(kind: str, references: list[str], predictions: list[str]) -> list[float]:
    """Each answer's score: 1 or 0 for a right or wrong label (classification), its ROUGE-L F1 against
    the reference (generation)."""
    if kind == "classification":
        return [float(p == r) for r, p in zip(references, predictions, strict=True)]
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(references, predictions, strict=True)]


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of `values` (0 for fewer than two)."""
    from statistics import stdev

    return stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def metrics(task: Task, examples: list[Example], predictions: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (classification), ROUGE-L and BLEU (generation), and the standard error of
    the first over the examples (`accuracy_se`, `rougeL_se`), so that a gap between two scores can be
    read against it."""
    gold = [e.label if task.kind == "classification" else e.target for e in examples]
    per_example = example_scores(task.kind, gold, predictions)
    if task.kind == "classification":
        from sklearn.metrics import f1_score

        return {
            "accuracy": float(sum(per_example) / len(per_example)),
            "accuracy_se": standard_error(per_example),
            "macro_f1": float(f1_score(gold, predictions, labels=task.labels, average="macro", zero_division=0)),
        }
    import sacrebleu

    return {
        "rougeL": float(sum(per_example) / len(per_example)),
        "rougeL_se": standard_error(per_example),
        "bleu": float(sacrebleu.corpus_bleu(predictions, [gold]).score),
    }
