"""UTKFace: labels in the file name, ``{age}_{gender}_{race}_{datetime}.jpg.chip.jpg``.

Real downloads hold malformed names; what can be parsed is kept (a missing race field leaves
race null, with a note in the report), the rest is rejected with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import PurePosixPath

from d2mtl.sources.base import Entry, LabelError, Source, class_code, number, register, rejected_entry

# The race field is one digit, the datetime many: "61_1_20170109142408075" is age 61, gender 1, no race.
NAME = re.compile(r"^(?P<age>\d+)_(?P<gender>\d+)(?:_(?P<race>\d))?(?:_(?P<datetime>\d+))?(?=\D|$)")


def parse_name(name: str) -> tuple[dict[str, float | int], list[str]]:
    """Labels and notes from a UTKFace file name; LabelError when it cannot be used."""
    match = NAME.match(name)
    if match is None:
        raise LabelError("malformed_name", f"{name!r} does not start with age_gender_race_datetime")
    labels: dict[str, float | int] = {
        "age": number("age", match["age"]),
        "gender": class_code("gender", match["gender"]),
    }
    notes = []
    if match["race"] is None:
        notes.append("race missing in file name")
    else:
        labels["race"] = class_code("race", match["race"])
    return labels, notes


@register
class UTKFace(Source):
    format = "utkface"
    download = (
        "download 'Aligned&Cropped Faces' (UTKFace.tar.gz) from https://susanqq.github.io/UTKFace/ "
        "and unpack the .jpg files there (or put the archive there)"
    )

    def entries(self) -> Iterator[Entry]:
        for rel in self.tree.files():
            uri = self.tree.uri(rel)
            try:
                labels, notes = parse_name(PurePosixPath(rel).name)
            except LabelError as err:
                yield rejected_entry(rel, uri, err)
                continue
            yield Entry(rel, uri, labels, notes=notes)
