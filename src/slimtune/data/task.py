"""A task: labelled (or input/target) examples in fixed train, validation and test splits."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

from .errors import DataError

Kind = Literal["classification", "generation"]


@dataclass(frozen=True)
class Example:
    """One example. Classification sets ``label``, generation sets ``target``; ``text_pair`` is the second
    text of a pair task (the hypothesis of NLI), ``group`` what the example belongs to (a film, a topic):
    splits made by group never put one group in two splits."""

    text: str
    label: str | None = None
    target: str | None = None
    text_pair: str | None = None
    group: str | None = None


@dataclass
class Task:
    """A named task with fixed splits. ``label_words`` maps each label to the word a verbalizer scores for it
    (``fresh`` -> ``positive``); it defaults to the labels themselves."""

    name: str
    kind: Kind
    train: list[Example] = field(repr=False)
    validation: list[Example] = field(repr=False)
    test: list[Example] = field(repr=False)
    labels: list[str] | None = None
    label_words: dict[str, str] | None = None
    description: str = ""
    source: str = ""
    licence: str = ""

    def __post_init__(self) -> None:
        if self.kind == "classification":
            if not self.labels:
                raise DataError(f"classification task {self.name!r} needs its list of labels")
            if self.label_words is None:
                self.label_words = {label: label for label in self.labels}
            if set(self.label_words) != set(self.labels):
                raise DataError(f"task {self.name!r}: label_words cover {sorted(self.label_words)}, "
                                f"the labels are {self.labels}")
            known = set(self.labels)
            for split, examples in self.splits.items():
                stray = {e.label for e in examples} - known
                if stray:
                    raise DataError(f"task {self.name!r}: {split} examples have labels {sorted(stray, key=str)} "
                                    f"outside the task's labels {self.labels}")
        elif self.kind == "generation":
            for split, examples in self.splits.items():
                if any(e.target is None for e in examples):
                    raise DataError(f"generation task {self.name!r}: every {split} example needs a target")
        else:
            raise DataError(f"task {self.name!r} has kind {self.kind!r}; expected 'classification' or 'generation'")

    @property
    def splits(self) -> dict[str, list[Example]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={len(examples)}" for split, examples in self.splits.items())
        labels = f", labels={self.labels}" if self.labels else ""
        return f"Task({self.name!r}, {self.kind}{labels}, {sizes})"


def split(examples: list[Example], fractions: tuple[float, ...], seed: int,
          by: Literal["label", "group"] | None = None) -> list[list[Example]]:
    """Cut ``examples`` into parts of the given fractions, the same parts for the same seed.

    ``by="label"`` cuts each label separately (stratified); ``by="group"`` cuts the sorted groups, so no
    group is in two parts (fractions then count groups, not examples). Each part comes out shuffled.
    """
    rng = random.Random(seed)
    parts: list[list[Example]] = [[] for _ in fractions]
    if by == "group":
        groups = sorted({e.group for e in examples})
        rng.shuffle(groups)
        part_of = dict(zip(groups, _part_indices(len(groups), fractions), strict=True))
        for example in examples:
            parts[part_of[example.group]].append(example)
    else:
        strata: dict[str, list[Example]] = defaultdict(list)
        for example in examples:
            strata[example.label if by == "label" else ""].append(example)
        for key in sorted(strata):
            stratum = strata[key]
            rng.shuffle(stratum)
            for example, index in zip(stratum, _part_indices(len(stratum), fractions), strict=True):
                parts[index].append(example)
    for part in parts:
        rng.shuffle(part)
    return parts


def _part_indices(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Which part each of n items goes to: every part but the first gets round(n * fraction), the first the rest."""
    sizes = [round(n * fraction) for fraction in fractions[1:]]
    return [index for index, size in enumerate([n - sum(sizes), *sizes]) for _ in range(size)]
