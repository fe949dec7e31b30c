"""Amazon fine-food reviews, great or other: sentiment in a second domain.

Source: the objects ``training_data`` (4,000 reviews) and ``testing_data`` (1,000) of the R package modeldata,
read from the lazy-load database of the Debian package r-cran-modeldata (fetched with ``apt-get download``
and unpacked into the cache, never installed). Each review is of a different product. ``testing_data`` is
the test split; ``training_data`` is cut 90/10 into train and validation, stratified by label, after dropping
reviews repeated within it or found in ``testing_data``.
"""

from __future__ import annotations

import functools
import gzip
import lzma
import warnings
from pathlib import Path

from ..assets import MissingAssetError, debian_package
from .errors import DataError
from .task import Example, Task, split

NAME = "amazon-food"
PACKAGE = "r-cran-modeldata"
LABEL_WORDS = {"great": "positive", "other": "negative"}
FRACTIONS = (0.9, 0.1)


def load(seed: int = 0) -> Task:
    """Is an Amazon fine-food review great (5 stars) or other?"""
    training, testing = read(debian_package(PACKAGE, f"the {NAME} data"))
    test_texts = {e.text for e in testing}
    seen: set[str] = set()
    distinct = []
    for example in training:
        if example.text not in seen and example.text not in test_texts:
            seen.add(example.text)
            distinct.append(example)
    train, validation = split(distinct, FRACTIONS, seed, by="label")
    return Task(NAME, "classification", train, validation, list(testing), labels=list(LABEL_WORDS),
                label_words=LABEL_WORDS,
                description="Is an Amazon fine-food review great (positive) or other (negative)? "
                            "modeldata's testing_data is the test split.",
                source=f"Debian {PACKAGE} (R package modeldata): objects training_data, testing_data",
                licence="MIT (modeldata); reviews from the SNAP Amazon Fine Food Reviews collection")


@functools.cache
def read(root: Path) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """modeldata's training_data and testing_data as examples."""
    data = root / "usr" / "lib" / "R" / "site-library" / "modeldata" / "data"
    try:
        database = _RLazyLoad(data)
        frames = database.load("training_data"), database.load("testing_data")
    except (OSError, KeyError, ValueError, lzma.LZMAError) as error:
        raise DataError(f"cannot read modeldata's R database in {data} ({error}); delete {root} "
                        "and load again to fetch it afresh") from error
    return tuple(tuple(Example(str(review).strip(), label=str(score))
                       for review, score in zip(frame["review"], frame["score"], strict=True))
                 for frame in frames)


class _RLazyLoad:
    """An R lazy-load database: an index (``Rdata.rdx``, gzipped) of byte ranges in ``Rdata.rdb``, each an
    xz-compressed serialised R object."""

    def __init__(self, folder: Path):
        try:
            import rdata
        except ImportError as error:
            raise MissingAssetError("reading the R data of modeldata needs the PyPI package rdata: "
                                    "pip install rdata") from error
        self.rdata = rdata
        self.index = self._convert(gzip.decompress((folder / "Rdata.rdx").read_bytes()))["variables"]
        self.blob = (folder / "Rdata.rdb").read_bytes()

    def load(self, name: str):
        offset, length = map(int, self.index[name])
        # 4 bytes of uncompressed length, one byte of compression type ("Z": xz), then a raw LZMA2 stream.
        chunk = self.blob[offset:offset + length]
        if chunk[4:5] != b"Z":
            raise ValueError(f"object {name!r} is not xz-compressed (type byte {chunk[4:5]!r})")
        raw = lzma.decompress(chunk[5:], format=lzma.FORMAT_RAW,
                              filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
        return self._convert(raw)

    def _convert(self, raw: bytes):
        with warnings.catch_warnings():  # rdata warns that R's tibble classes map to plain data frames
            warnings.simplefilter("ignore", UserWarning)
            return self.rdata.conversion.convert(self.rdata.parser.parse_data(raw))
