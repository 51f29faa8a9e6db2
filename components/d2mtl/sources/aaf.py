"""All-Age-Faces: ``All-Age-Faces Dataset/aglined faces/%05dA%02d.jpg`` (sic) + ``image sets/*.txt``.

Age comes from the file name (image number, ``A``, age in years); gender from the chosen image-set
pair (lines ``00000A02.jpg 0``, 0 = female, 1 = male). The pair's train file is the training part
(val carved out by the stage), its val file is our test part. Without the val file (a copy holding
only the train file), every image is hash-split like a dataset without an official split. An image
named in no present image-set file keeps its age, gender null (a note), hash split.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from d2mtl.errors import UserError
from d2mtl.sources.base import TRAINVAL, Entry, LabelError, Source, class_code, number, register, rejected_entry

IMAGE_DIRS = ("aglined faces", "aligned faces")  # the release's spelling, and the corrected one
SET_DIR = "image sets"
NAME = re.compile(r"^\d{5}A(?P<age>\d{2})\.jpg$")
GENDERS = {"0": "female", "1": "male"}
NOT_IN_SETS = "gender missing (in no image-set file)"


def parse_name(name: str) -> dict[str, float | int]:
    match = NAME.match(name)
    if match is None:
        raise LabelError("malformed_name", f"{name!r} is not <5-digit number>A<2-digit age>.jpg")
    return {"age": number("age", match["age"])}


@register
class AAF(Source):
    format = "aaf"
    download = (
        "download All-Age-Faces (All-Age-Faces Dataset.zip) from https://github.com/JingchunCheng/"
        "All-Age-Faces-Dataset and unpack it there ('All-Age-Faces Dataset/aglined faces/' and "
        "'image sets/')"
    )

    def _set_files(self) -> tuple[str, dict[str, str]]:
        """The dataset folder (prefix of ``image sets/``) and the chosen pair's present files -> split."""
        parts = zip(self.spec.image_sets.split("/"), (TRAINVAL, "test"), strict=True)
        found = {rel: part for name, part in parts if (rel := self.tree.find(f"{SET_DIR}/{name}.txt"))}
        if not found:
            raise UserError(
                f"{self.tree.base_uri}: no image-set files of the pair {self.spec.image_sets!r} "
                f"in '{SET_DIR}/'; {self.download}"
            )
        first = next(iter(found))
        return first[: first.rindex(f"{SET_DIR}/")], found

    def entries(self) -> Iterator[Entry]:
        base, set_files = self._set_files()
        files = self.tree.files()
        image_dir = next(
            (f"{base}{d}/" for d in IMAGE_DIRS if any(f.startswith(f"{base}{d}/") for f in files)),
            f"{base}{IMAGE_DIRS[0]}/",
        )
        images = {f[len(image_dir) :]: f for f in files if f.startswith(image_dir)}
        official_test = "test" in set_files.values()
        listed: set[str] = set()
        for set_file, part in set_files.items():
            lines = self.tree.read(set_file).decode("utf-8", errors="replace").splitlines()
            for line_number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                entry = self._listed_entry(line, f"{set_file}#line={line_number}", image_dir, images, listed)
                if entry.reject is None:
                    entry.split = part if official_test else None
                yield entry
        for name, image in images.items():
            if name not in listed:
                yield self._unlisted_entry(name, image)

    def _listed_entry(self, line: str, where: str, image_dir: str, images: dict[str, str], listed: set[str]) -> Entry:
        fields = line.split()
        if len(fields) != 2:
            return Entry(
                where,
                self.tree.uri(where),
                reject="malformed_line",
                detail=f"{line.strip()!r}: expected '<name>.jpg <0|1>'",
            )
        name, code = fields
        image = image_dir + name
        uri = self.tree.uri(image)
        if name in listed:
            return Entry(where, self.tree.uri(where), reject="duplicate_line", detail=f"{name} listed again")
        listed.add(name)
        if name not in images:
            return Entry(image, uri, reject="missing_file", detail=f"named in {where}")
        try:
            labels = parse_name(name)
            if code not in GENDERS:
                raise LabelError("label_out_of_range", f"AAF gender code {code!r} is not 0 (female) or 1 (male)")
            labels["gender"] = class_code("gender", GENDERS[code])
        except LabelError as err:
            return rejected_entry(image, uri, err)
        return Entry(image, uri, labels)

    def _unlisted_entry(self, name: str, image: str) -> Entry:
        uri = self.tree.uri(image)
        try:
            return Entry(image, uri, parse_name(name), notes=[NOT_IN_SETS])
        except LabelError as err:
            return rejected_entry(image, uri, err)
