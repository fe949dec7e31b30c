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
    text of a pair task (the hypothesis of NLI), ``group`` what the example belongs to (a film, a topic, a
    user); see :func:`split` for how groups are cut."""

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
    # When the test split is itself out of distribution: (what validation holds, what test holds),
    # e.g. ("seen topics", "unseen topics"); the comparison then scores validation in distribution.
    shifted_test: tuple[str, str] | None = None

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


SplitBy = Literal["label", "group", "group and label"]


def split(examples: list[Example], fractions: tuple[float, ...], seed: int,
          by: SplitBy | None = None) -> list[list[Example]]:
    """Cut ``examples`` into parts of the given fractions, the same parts for the same seed.

    ``by="label"`` cuts each label alike (stratified); ``by="group"`` cuts the sorted groups, so no group is
    in two parts (fractions then count groups, not examples); ``by="group and label"`` cuts each group (a user)
    and each label within it alike, so every group has examples in every part. Each part comes out shuffled.
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
        strata: dict[tuple[str, str], list[Example]] = defaultdict(list)
        for example in examples:
            group = (example.group or "") if by == "group and label" else ""
            label = (example.label or "") if by in ("label", "group and label") else ""
            strata[group, label].append(example)
        ordered = []
        for key in sorted(strata):
            rng.shuffle(strata[key])
            ordered += strata[key]
        # Each stratum is one run of `ordered`, and the parts are spread evenly along it, so each stratum is cut
        # close to the fractions while the part sizes come out exact.
        for example, index in zip(ordered, _part_indices(len(ordered), fractions), strict=True):
            parts[index].append(example)
    for part in parts:
        rng.shuffle(part)
    return parts


def _part_indices(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Which part each of n items goes to: every part but the first gets round(n * fraction) items, the first the
    rest, and the parts take turns evenly (each next item goes to the part furthest behind its share)."""
    sizes = [round(n * fraction) for fraction in fractions[1:]]
    sizes = [n - sum(sizes), *sizes]
    taken = [0] * len(sizes)
    indices = []
    for i in range(1, n + 1):
        part = max(range(len(sizes)), key=lambda k: sizes[k] * i / n - taken[k])
        taken[part] += 1
        indices.append(part)
    return indices
