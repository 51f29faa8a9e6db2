"""FairFace: ``fairface_label_{train,val}.csv`` (file, age, gender, race) + the ``train/`` and ``val/`` images.

Age is a group (``20-29``, ``more than 70``) -> age_low / age_high. The 7 race groups map onto the
registry's 5 through ``race_map`` (a group mapped to null leaves race null, noted in the report).
The official val part is our test split; val is carved out of the official train part.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator

from d2mtl.errors import UserError
from d2mtl.sources.base import TRAINVAL, Entry, LabelError, Source, class_code, number, register, rejected_entry
from d2mtl.tasks import TASKS

LABEL_FILES = {"fairface_label_train.csv": TRAINVAL, "fairface_label_val.csv": "test"}
COLUMNS = ("file", "age", "gender", "race")
RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
ABOVE = re.compile(r"^more than (\d+)$", re.IGNORECASE)


def parse_age_group(text: str) -> dict[str, float]:
    text = text.strip()
    if match := RANGE.match(text):
        return {"age_low": number("age", match[1]), "age_high": number("age", match[2])}
    if match := ABOVE.match(text):
        return {"age_low": number("age", match[1]), "age_high": TASKS["age"].value_range[1]}
    raise LabelError("malformed_label", f"age group {text!r}")


@register
class FairFace(Source):
    format = "fairface"
    download = (
        "download FairFace (padding 0.25 images + fairface_label_train.csv / fairface_label_val.csv) from "
        "https://github.com/joojs/fairface and put them there"
    )

    def entries(self) -> Iterator[Entry]:
        found = {name: self.tree.find(name) for name in LABEL_FILES}
        if not any(found.values()):
            raise UserError(f"{self.tree.base_uri}: no {' or '.join(LABEL_FILES)}; {self.download}")
        for name, rel in found.items():
            if rel is None:
                continue
            reader = csv.DictReader(io.StringIO(self.tree.read(rel).decode("utf-8")))
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{self.tree.uri(rel)}: missing column(s) {', '.join(missing)}")
            base = rel[: -len(name)]
            for row in reader:
                yield self._entry(base + row["file"], row, LABEL_FILES[name])

    def _entry(self, image: str, row: dict[str, str], split: str) -> Entry:
        uri = self.tree.uri(image)
        race_name = (row["race"] or "").strip()
        try:
            labels: dict[str, float | int] = parse_age_group(row["age"] or "")
            labels["gender"] = class_code("gender", row["gender"] or "")
            if race_name not in self.spec.race_map:
                raise LabelError("unknown_class", f"race {race_name!r} not in race_map")
            mapped = self.spec.race_map[race_name]
            if mapped is not None:
                labels["race"] = class_code("race", mapped)
        except LabelError as err:
            return rejected_entry(image, uri, err)
        notes = [f"race {race_name} mapped to null"] if self.spec.race_map.get(race_name, "") is None else []
        return Entry(image, uri, labels, split=split, notes=notes)
