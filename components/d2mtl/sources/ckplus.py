"""CK+ in its common emotion-folder form: ``<emotion>/S###_###_########.png``.

The subject id is the ``S###`` prefix (splits hash by subject, so no person is in two splits).
CK+ has a ``contempt`` class the registry does not: it is mapped to the class the config names,
or every such row is reported as dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import PurePosixPath

from d2mtl.sources.base import Entry, LabelError, Source, class_code, register, rejected_entry

SUBJECT = re.compile(r"^(S\d+)_")


@register
class CKPlus(Source):
    format = "ckplus"
    download = (
        "request CK+ from https://www.jeffcohn.net/Resources/ (or use the CK+48 emotion-folder copy) and "
        "put the <emotion>/S###_*.png folders there"
    )

    def entries(self) -> Iterator[Entry]:
        for rel in self.tree.files():
            uri = self.tree.uri(rel)
            path = PurePosixPath(rel)
            subject = SUBJECT.match(path.name)
            if len(path.parts) < 2 or subject is None:
                yield Entry(rel, uri, reject="malformed_name", detail="expected <emotion>/S###_###_*.png")
                continue
            emotion = path.parts[-2]
            if emotion.lower() == "contempt":
                if self.spec.contempt is None:
                    yield Entry(rel, uri, reject="dropped_class", detail="contempt (set contempt: to map it)")
                    continue
                emotion = self.spec.contempt
            try:
                yield Entry(rel, uri, {"expression": class_code("expression", emotion)}, subject=subject[1])
            except LabelError as err:
                yield rejected_entry(rel, uri, err)
