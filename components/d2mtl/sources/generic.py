"""Layouts not tied to one dataset: a folder per class, and a CSV manifest of paths and labels."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import PurePosixPath

from d2mtl.errors import UserError
from d2mtl.sources.base import Entry, LabelError, Source, class_code, number, register, rejected_entry
from d2mtl.tasks import TASKS

SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
INTERVAL_COLUMNS = ("age_low", "age_high")


@register
class ImageFolder(Source):
    """``<class>/<file>`` or ``<split>/<class>/<file>``; the class names one task's classes."""

    format = "image_folder"
    download = "put the images there as <class>/<image> or <train|val|test>/<class>/<image>"

    def entries(self) -> Iterator[Entry]:
        task = TASKS.get(self.spec.task)
        if task is None or task.kind != "classification":
            raise UserError(
                f"dataset {self.spec.name}: image_folder needs a classification task, got "
                f"{self.spec.task!r} (classification tasks: "
                f"{', '.join(t.name for t in TASKS.values() if t.kind == 'classification')})"
            )
        for rel in self.tree.files():
            uri = self.tree.uri(rel)
            parts = PurePosixPath(rel).parts
            split = SPLIT_FOLDERS.get(parts[0].lower()) if len(parts) == 3 else None
            if len(parts) != 2 and split is None:
                yield Entry(rel, uri, reject="unexpected_path", detail="expected [<split>/]<class>/<image>")
                continue
            try:
                yield Entry(rel, uri, {task.name: class_code(task.name, parts[-2])}, split=split)
            except LabelError as err:
                yield rejected_entry(rel, uri, err)


@register
class CsvManifest(Source):
    """A CSV with a path column and any task columns (class names or codes; empty = no label)."""

    format = "csv_manifest"
    download = "put the images and the manifest CSV (a path column + task columns) there"

    def _columns(self, header: list[str]) -> dict[str, str]:
        """label column name (task or age_low / age_high) -> CSV column."""
        columns = dict(self.spec.columns) or {name: name for name in (*TASKS, *INTERVAL_COLUMNS) if name in header}
        unknown = [task for task in columns if task not in TASKS and task not in INTERVAL_COLUMNS]
        if unknown:
            raise UserError(
                f"dataset {self.spec.name}: unknown task(s) {', '.join(unknown)} in columns; "
                f"known: {', '.join(TASKS)}, age_low, age_high"
            )
        return columns

    def entries(self) -> Iterator[Entry]:
        if self.spec.manifest not in self.tree.files():
            raise UserError(f"dataset {self.spec.name}: no {self.spec.manifest} in {self.tree.base_uri}")
        reader = csv.DictReader(io.StringIO(self.tree.read(self.spec.manifest).decode("utf-8-sig")))
        header = reader.fieldnames or []
        columns = self._columns(header)
        wanted = [
            self.spec.path_column,
            *columns.values(),
            *(c for c in (self.spec.split_column, self.spec.subject_column) if c),
        ]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise UserError(
                f"{self.tree.uri(self.spec.manifest)}: missing column(s) {', '.join(missing)}; has {', '.join(header)}"
            )
        for row in reader:
            yield self._entry(row, columns)

    def _entry(self, row: dict[str, str], columns: dict[str, str]) -> Entry:
        rel = PurePosixPath(row[self.spec.path_column] or "").as_posix()
        uri = self.tree.uri(rel)
        split = (row[self.spec.split_column] or "").strip().lower() if self.spec.split_column else None
        subject = (row[self.spec.subject_column] or "").strip() or None if self.spec.subject_column else None
        splits = SPLIT_FOLDERS | {value.lower(): part for value, part in self.spec.split_map.items()}
        if split is not None and split not in splits:
            return Entry(rel, uri, reject="unknown_split", detail=f"split {split!r}")
        labels: dict[str, float | int] = {}
        try:
            for name, column in columns.items():
                value = (row[column] or "").strip()
                if not value:
                    continue
                if name in INTERVAL_COLUMNS:
                    labels[name] = number("age", value)
                elif TASKS[name].kind == "regression":
                    labels[name] = number(name, value)
                else:
                    labels[name] = class_code(name, value)
        except LabelError as err:
            return rejected_entry(rel, uri, err)
        return Entry(rel, uri, labels, split=splits[split] if split else None, subject=subject)
