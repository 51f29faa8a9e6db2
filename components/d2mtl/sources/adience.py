"""Adience: ``fold_{0..4}_data.txt`` (tab-separated) + ``aligned/<user_id>/landmark_aligned_face.<face_id>.<image>``.

Age is labelled as a group, ``(25, 32)``: it goes to age_low / age_high (age stays null); a few
rows carry a single number, which is an exact age. Gender ``m`` / ``f``; ``u`` or empty leaves it null.
Splits are the official folds: the config names the validation and test folds, the rest train.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator

from d2mtl.errors import UserError
from d2mtl.sources.base import Entry, LabelError, Source, class_code, number, register, rejected_entry

FOLD_FILE = re.compile(r"(?:^|/)fold_(\d+)_data\.txt$")
COLUMNS = ("user_id", "original_image", "face_id", "age", "gender")
GROUP = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$")


def parse_age(text: str) -> dict[str, float]:
    text = text.strip()
    if text in ("", "None"):
        return {}
    group = GROUP.match(text)
    if group:
        low, high = number("age", group[1]), number("age", group[2])
        if low > high:
            raise LabelError("label_out_of_range", f"age group {text!r} has low > high")
        return {"age_low": low, "age_high": high}
    return {"age": number("age", text)}


@register
class Adience(Source):
    format = "adience"
    download = (
        "download the Adience 'aligned' faces and fold_*_data.txt files from "
        "https://talhassner.github.io/home/projects/Adience/Adience-data.html and put them there"
    )

    def _split(self, fold: int) -> str:
        if fold in self.spec.test_folds:
            return "test"
        return "val" if fold in self.spec.val_folds else "train"

    def entries(self) -> Iterator[Entry]:
        folds = [(int(m[1]), rel) for rel in self.tree.files() if (m := FOLD_FILE.search(rel))]
        if not folds:
            raise UserError(f"{self.tree.base_uri}: no fold_*_data.txt files; {self.download}")
        for fold, rel in sorted(folds):
            text = self.tree.read(rel).decode("utf-8", errors="replace")
            reader = csv.DictReader(io.StringIO(text), delimiter="\t")
            fields = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in fields]
            if missing:
                raise UserError(f"{self.tree.uri(rel)}: missing column(s) {', '.join(missing)}")
            reader.fieldnames = fields
            for row in reader:
                yield self._entry(row, fold)

    def _entry(self, row: dict[str, str], fold: int) -> Entry:
        image = f"{self.spec.image_dir}/{row['user_id']}/landmark_aligned_face.{row['face_id']}.{row['original_image']}"
        uri = self.tree.uri(image)
        try:
            labels: dict[str, float | int] = parse_age(row["age"] or "")
            gender = (row["gender"] or "").strip()
            if gender not in ("", "u"):
                labels["gender"] = class_code("gender", gender)
        except LabelError as err:
            return rejected_entry(image, uri, err)
        notes = [] if labels else ["no age or gender label"]
        return Entry(image, uri, labels, split=self._split(fold), subject=row["user_id"], notes=notes)
