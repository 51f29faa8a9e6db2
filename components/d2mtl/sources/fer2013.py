"""FER2013 in both forms people download: the original CSV and the folder-per-emotion layout.

Splits are the official ones: ``Training`` / ``train/`` is the training part (the stage carves
"val" out of it by sample id), ``PublicTest`` / ``test/`` and ``PrivateTest`` are "test".
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath

import numpy as np

from d2mtl.errors import UserError
from d2mtl.sources.base import (
    TRAINVAL,
    Entry,
    LabelError,
    Payload,
    Rejected,
    Source,
    class_code,
    register,
    rejected_entry,
)

FOLDER_SPLITS = {
    "train": TRAINVAL,
    "training": TRAINVAL,
    "test": "test",
    "publictest": "test",
    "privatetest": "test",
    "val": "val",
    "validation": "val",
}
CSV_USAGE = {"Training": TRAINVAL, "PublicTest": "test", "PrivateTest": "test"}
CSV_COLUMNS = ("emotion", "pixels", "Usage")
DOWNLOAD = (
    "download FER2013 from https://www.kaggle.com/c/challenges-in-representation-learning-facial-"
    "expression-recognition-challenge/data (fer2013.csv) or https://www.kaggle.com/datasets/msambare/fer2013 "
    "(train/ and test/ emotion folders) and put it there"
)


@register
class FER2013Folder(Source):
    """``<split>/<emotion>/<file>.jpg``."""

    format = "fer2013_folder"
    download = DOWNLOAD

    def entries(self) -> Iterator[Entry]:
        for rel in self.tree.files():
            uri = self.tree.uri(rel)
            parts = PurePosixPath(rel).parts
            if len(parts) != 3:
                yield Entry(rel, uri, reject="unexpected_path", detail="expected <split>/<emotion>/<file>")
                continue
            split = FOLDER_SPLITS.get(parts[0].lower())
            if split is None:
                yield Entry(rel, uri, reject="unknown_split", detail=f"folder {parts[0]!r}")
                continue
            try:
                yield Entry(rel, uri, {"expression": class_code("expression", parts[1])}, split=split)
            except LabelError as err:
                yield rejected_entry(rel, uri, err)


def _pixels(text: str) -> np.ndarray:
    values = np.array(text.split(), dtype=np.int64)
    side = round(len(values) ** 0.5)
    if len(values) == 0 or side * side != len(values) or values.min() < 0 or values.max() > 255:
        raise ValueError(f"{len(values)} pixel values, expected a square image of 0-255 values")
    return values.astype(np.uint8).reshape(side, side)


@register
class FER2013Csv(Source):
    """The original ``fer2013.csv``: ``emotion,pixels,Usage``, 48 x 48 gray pixels per row."""

    format = "fer2013_csv"
    download = DOWNLOAD

    def _rows(self) -> Iterator[tuple[int, dict[str, str]]]:
        found = self.tree.find(self.spec.csv)
        if found is None:
            raise UserError(f"{self.tree.base_uri}: no {self.spec.csv}; {DOWNLOAD}")
        self.csv_path = found
        with self.tree.open(found) as handle:
            reader = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8", newline=""))
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(
                    f"{self.tree.uri(found)}: missing column(s) {', '.join(missing)}; expected {','.join(CSV_COLUMNS)}"
                )
            yield from enumerate(reader)

    def entries(self) -> Iterator[Entry]:
        for index, row in self._rows():
            rel, uri = f"{self.csv_path}#row={index}", f"{self.tree.uri(self.csv_path)}#row={index}"
            split = CSV_USAGE.get((row["Usage"] or "").strip())
            if split is None:
                yield Entry(rel, uri, reject="unknown_split", detail=f"Usage {row['Usage']!r}")
                continue
            try:
                yield Entry(rel, uri, {"expression": class_code("expression", row["emotion"] or "")}, split=split)
            except LabelError as err:
                yield rejected_entry(rel, uri, err)

    def payloads(self, entries: Iterable[Entry]) -> Iterator[Payload]:
        wanted = iter(entries)
        entry = next(wanted, None)
        for index, row in self._rows():
            if entry is None:
                return
            if entry.path != f"{self.csv_path}#row={index}":
                continue
            try:
                yield _pixels(row["pixels"] or "")
            except ValueError as err:
                yield Rejected("unreadable_image", str(err))
            entry = next(wanted, None)
