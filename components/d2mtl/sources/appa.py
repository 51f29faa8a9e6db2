"""APPA-REAL, the official release: ``gt_avg_{train,valid,test}.csv`` + ``train/``, ``valid/``, ``test/``.

CSV columns ``file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age``; the face crop of
``000000.jpg`` is ``<part>/000000.jpg_face.jpg``. Age is ``real_age`` (``age: apparent`` reads
``apparent_age_avg``). Splits: the release's own train / valid / test; a copy without the test CSV
makes valid our test and carves val out of train, so a test split exists either way.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from d2mtl.errors import UserError
from d2mtl.sources.base import TRAINVAL, Entry, LabelError, Source, number, register, rejected_entry

PARTS = ("train", "valid", "test")
AGE_COLUMNS = {"real": "real_age", "apparent": "apparent_age_avg"}
FACE_SUFFIX = "_face.jpg"


@register
class APPAReal(Source):
    format = "appa_real"
    download = (
        "download appa-real-release.zip from https://chalearnlap.cvc.uab.cat/dataset/26/description/ and "
        "unpack it there (gt_avg_train.csv, gt_avg_valid.csv, gt_avg_test.csv, train/, valid/, test/)"
    )

    def entries(self) -> Iterator[Entry]:
        found = {part: rel for part in PARTS if (rel := self.tree.find(f"gt_avg_{part}.csv"))}
        if "train" not in found and "valid" not in found:
            raise UserError(f"{self.tree.base_uri}: no gt_avg_train.csv or gt_avg_valid.csv; {self.download}")
        splits = (
            {"train": "train", "valid": "val", "test": "test"}
            if "test" in found
            else {"train": TRAINVAL, "valid": "test"}
        )
        files = set(self.tree.files())
        column = AGE_COLUMNS[self.spec.age]
        for part, rel in found.items():
            reader = csv.DictReader(io.StringIO(self.tree.read(rel).decode("utf-8-sig")))
            if "file_name" not in (reader.fieldnames or []) or column not in (reader.fieldnames or []):
                raise UserError(
                    f"{self.tree.uri(rel)}: missing column file_name or {column}; "
                    f"has {', '.join(reader.fieldnames or [])}"
                )
            base = rel[: -len(f"gt_avg_{part}.csv")]
            for row_number, row in enumerate(reader, 2):
                image = f"{base}{part}/{(row['file_name'] or '').strip()}{FACE_SUFFIX}"
                uri = self.tree.uri(image)
                if image not in files:
                    yield Entry(image, uri, reject="missing_file", detail=f"row {row_number} of {rel}")
                    continue
                try:
                    yield Entry(image, uri, {"age": number("age", (row[column] or "").strip())}, split=splits[part])
                except LabelError as err:
                    yield rejected_entry(image, uri, err)
