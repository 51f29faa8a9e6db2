"""RAF-DB basic: ``basic/EmoLabel/list_patition_label.txt`` + ``basic/Image/aligned/<name>_aligned.jpg``.

Each label line is ``train_00001.jpg 5``, codes 1-7 in RAF-DB's order (not FER2013's). ``train_*`` lines
are the official training part (val carved out by the stage), ``test_*`` lines the official test part.
A copy without any ``test_*`` line (the train part alone) is hash-split like a dataset without an
official split (``split.test_fraction`` / ``val_fraction``), so it still has a test split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath

from d2mtl.errors import UserError
from d2mtl.sources.base import TRAINVAL, Entry, Source, class_code, register

LABEL_FILE = "EmoLabel/list_patition_label.txt"
IMAGE_DIR = "Image/aligned"
EXPRESSIONS = {"1": "surprise", "2": "fear", "3": "disgust", "4": "happy", "5": "sad", "6": "angry", "7": "neutral"}
SPLITS = {"train": TRAINVAL, "test": "test"}


@register
class RAFDB(Source):
    format = "rafdb"
    download = (
        "request RAF-DB from http://www.whdeng.cn/raf/model1.html and unpack its basic/ folder there "
        "(basic/EmoLabel/list_patition_label.txt and basic/Image/aligned/)"
    )

    def entries(self) -> Iterator[Entry]:
        label_file = self.tree.find(LABEL_FILE)
        if label_file is None:
            raise UserError(f"{self.tree.base_uri}: no {LABEL_FILE}; {self.download}")
        base = label_file[: -len(LABEL_FILE)]
        files = set(self.tree.files())
        lines = self.tree.read(label_file).decode("utf-8", errors="replace").splitlines()
        official_test = any(line.startswith("test_") for line in lines)
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield self._entry(line, f"{label_file}#line={number}", base, files, official_test)

    def _entry(self, line: str, where: str, base: str, files: set[str], official_test: bool) -> Entry:
        fields = line.split()
        if len(fields) != 2 or not fields[0].endswith(".jpg"):
            return Entry(
                where,
                self.tree.uri(where),
                reject="malformed_line",
                detail=f"{line.strip()!r}: expected '<name>.jpg <code 1-7>'",
            )
        name, code = fields
        image = f"{base}{IMAGE_DIR}/{PurePosixPath(name).stem}_aligned.jpg"
        uri = self.tree.uri(image)
        part = SPLITS.get(name.split("_", 1)[0])
        if part is None:
            return Entry(image, uri, reject="unknown_split", detail=f"{name!r} starts with neither train_ nor test_")
        if image not in files:
            return Entry(image, uri, reject="missing_file", detail=f"named in {where}")
        if code not in EXPRESSIONS:
            reason = "label_out_of_range" if code.lstrip("-").isdigit() else "malformed_label"
            return Entry(image, uri, reject=reason, detail=f"RAF-DB expression code {code!r} is not 1-7")
        return Entry(
            image,
            uri,
            {"expression": class_code("expression", EXPRESSIONS[code])},
            split=part if official_test else None,
        )
