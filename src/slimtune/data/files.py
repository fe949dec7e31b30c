"""A task from the user's own CSV or JSON-lines files.

Columns (CSV header, or keys of each JSON object): ``text`` and ``label`` for classification, ``input`` and
``target`` for generation; optional ``text_pair`` (second text of a pair) and a group column (``Example.group``).
Other columns are ignored. Every value must be a non-empty string (a JSON number is read as its text, so labels
0/1 work).

Given one file, it is cut 80/10/10 into train, validation and test, stratified by label. Given a ``test`` file,
the first file is cut 90/10 into train and validation; given ``validation`` and ``test`` files, nothing is cut.

Groups change the cut. A column named ``group`` holds units that must not leak across splits (a film, an
author): no group lands in two splits. A column named with ``group_column=`` (``"user"``) holds owners that
each need examples everywhere: each group is cut like the whole, so every user is in every split.
``keep_groups_apart`` overrides either choice.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError
from .task import Example, Kind, SplitBy, Task, split

SUFFIXES = (".csv", ".jsonl")
COLUMNS: dict[Kind, tuple[str, str]] = {"classification": ("text", "label"), "generation": ("input", "target")}
DEFAULT_GROUP = "group"
EXPECTED = "expected columns text and label (classification) or input and target (generation)"

Record = tuple[int, dict[str, object]]  # (line number, fields)


def load(path: str | os.PathLike, seed: int = 0, *, labels: list[str] | None = None,
         validation: str | os.PathLike | None = None, test: str | os.PathLike | None = None,
         group_column: str = DEFAULT_GROUP, keep_groups_apart: bool | None = None) -> Task:
    """Read the examples of ``path`` (and of ``validation`` / ``test`` when given) into a task.

    ``labels`` fixes the label set and its order: a label outside it is an error. Without it the labels are
    the sorted labels found in the files. ``group_column`` names the column read into ``Example.group``;
    ``keep_groups_apart`` defaults to True for the ``group`` column and False for any other (see above).
    """
    path = Path(path)
    kind, examples = read(path, labels, group_column)
    given = {}
    for split_name, other in (("validation", validation), ("test", test)):
        if other is not None:
            other_kind, given[split_name] = read(Path(other), labels, group_column)
            if other_kind != kind:
                raise DataError(f"{other} holds {other_kind} examples, {path} holds {kind} examples; "
                                f"a {split_name} file needs the same columns as the training file")
    if kind == "generation" and labels is not None:
        raise DataError(f"{path} holds generation examples (input, target); labels= applies to classification only")
    with_group = {e.group is not None for e in examples}
    if len(with_group) == 2:
        raise DataError(f"{path}: some examples have a group and some do not; give every example a group, or none")
    missing = [name for name in ("validation", "test") if name not in given]
    parts = {"train": examples}
    if missing:
        fractions = (0.8, 0.1, 0.1) if len(missing) == 2 else (0.9, 0.1)
        if keep_groups_apart is None:
            keep_groups_apart = group_column == DEFAULT_GROUP
        by: SplitBy | None = "label" if kind == "classification" else None
        if with_group == {True}:
            by = "group" if keep_groups_apart else "group and label"
        cut = split(examples, fractions, seed, by=by)
        parts = dict(zip(["train", *missing], cut, strict=True))
        empty = [name for name, part in parts.items() if not part]
        if empty:
            unit = "groups" if by == "group" else "examples"
            raise DataError(f"{path} has too few {unit} to cut into {', '.join(parts)} "
                            f"({'/'.join(str(round(f * 100)) for f in fractions)}): the {', '.join(empty)} "
                            f"split came out empty. Add examples, or pass validation= and test= files")
    parts.update(given)
    if kind == "classification" and labels is None:
        labels = sorted({e.label for part in parts.values() for e in part})
    return Task(path.stem, kind, parts["train"], parts["validation"], parts["test"],
                labels=list(labels) if kind == "classification" else None,
                description=f"examples from {path.name}", source=str(path))


def read(path: Path, labels: list[str] | None = None, group_column: str = DEFAULT_GROUP) -> tuple[Kind, list[Example]]:
    """The kind of task a file holds and its examples, with errors that name the file and line."""
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: cannot read a {path.suffix or 'suffix-less'} file; "
                        f"expected a .csv or .jsonl file ({EXPECTED})")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = _csv_records(path) if path.suffix.lower() == ".csv" else _jsonl_records(path)
    kind: Kind | None = None
    examples = []
    for line, fields in records:
        if kind is None:
            kind = _kind(path, line, fields)
        first, second = COLUMNS[kind]
        values = {name: _string(path, line, fields, name) for name in (first, second)}
        if "text_pair" in fields:
            values["text_pair"] = _string(path, line, fields, "text_pair")
        if group_column in fields or group_column != DEFAULT_GROUP:  # a group column asked for by name must be there
            values["group"] = _string(path, line, fields, group_column)
        if kind == "classification":
            if labels is not None and values["label"] not in labels:
                raise DataError(f"{path} line {line}: label {values['label']!r} is not one of the given "
                                f"labels {list(labels)}")
            examples.append(Example(values["text"], label=values["label"], text_pair=values.get("text_pair"),
                                    group=values.get("group")))
        else:
            examples.append(Example(values["input"], target=values["target"], text_pair=values.get("text_pair"),
                                    group=values.get("group")))
    if kind is None:
        raise DataError(f"{path} is empty: it holds no examples ({EXPECTED})")
    return kind, examples


def _kind(path: Path, line: int, fields: dict[str, object]) -> Kind:
    for kind, columns in COLUMNS.items():
        if all(column in fields for column in columns):
            return kind
    found = ", ".join(map(str, fields)) or "none"
    where = "the header" if path.suffix.lower() == ".csv" else f"line {line}"
    raise DataError(f"{path}: {where} has columns {found}; {EXPECTED}")


def _string(path: Path, line: int, fields: dict[str, object], name: str) -> str:
    if name not in fields:
        if path.suffix.lower() == ".csv":
            raise DataError(f"{path}: no {name!r} column; the header has {', '.join(map(str, fields))}")
        raise DataError(f"{path} line {line}: no {name!r} field; every line needs the same fields as the first")
    value = fields[name]
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{path} line {line}: {name!r} is {json.dumps(value)}; expected a string")
    value = value if name in ("text", "text_pair", "input", "target") else value.strip()
    if not value.strip():
        raise DataError(f"{path} line {line}: {name!r} is empty")
    return value


def _csv_records(path: Path) -> Iterator[Record]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file)
            for row in reader:
                if None in row:
                    raise DataError(f"{path} line {reader.line_num}: more fields than the header's "
                                    f"{len(reader.fieldnames)} (an unquoted comma?)")
                if any(value is None for value in row.values()):
                    raise DataError(f"{path} line {reader.line_num}: fewer fields than the header's "
                                    f"{len(reader.fieldnames)}")
                yield reader.line_num, row
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error})") from error
    except csv.Error as error:
        raise DataError(f"{path}: not valid CSV ({error})") from error


def _jsonl_records(path: Path) -> Iterator[Record]:
    try:
        with open(path, encoding="utf-8-sig") as file:
            for line, text in enumerate(file, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path} line {line}: not valid JSON ({error.msg} at column {error.colno})") \
                        from error
                if not isinstance(record, dict):
                    raise DataError(f"{path} line {line}: expected a JSON object such as "
                                    f'{{"text": "...", "label": "..."}}, got {type(record).__name__}')
                yield line, record
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error})") from error
