"""JAFFE: codes in the file name, ``KA.AN1.39.tiff`` = subject KA, expression AN (1st take), image 39.

Splits hash by subject (10 women).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import PurePosixPath

from d2mtl.sources.base import Entry, Source, class_code, register

NAME = re.compile(r"^(?P<subject>[A-Z]{2})\.(?P<code>[A-Z]{2})\d*\.\d+\.\w+$")
CODES = {"AN": "angry", "DI": "disgust", "FE": "fear", "HA": "happy", "SA": "sad", "SU": "surprise", "NE": "neutral"}


@register
class JAFFE(Source):
    format = "jaffe"
    download = "download JAFFE from https://zenodo.org/records/3451524 and put the .tiff files there"

    def entries(self) -> Iterator[Entry]:
        for rel in self.tree.files():
            uri = self.tree.uri(rel)
            match = NAME.match(PurePosixPath(rel).name)
            if match is None:
                yield Entry(rel, uri, reject="malformed_name", detail="expected SUBJECT.CODEn.NUMBER.tiff")
            elif match["code"] not in CODES:
                yield Entry(rel, uri, reject="unknown_class", detail=f"expression code {match['code']!r}")
            else:
                yield Entry(
                    rel, uri, {"expression": class_code("expression", CODES[match["code"]])}, subject=match["subject"]
                )
