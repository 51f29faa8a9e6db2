"""What every dataset adapter shares: the entry it lists, the registry by format name, label parsing.

An adapter lists *entries* (relative source path, labels, split, subject, or the reason the entry
cannot be used) without reading images, then yields each kept entry's *payload* (encoded image
bytes, a decoded pixel array, or a ``Rejected``) in the same order. The ingest stage does the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from d2mtl.config.ingest import DatasetSpec
from d2mtl.sources.trees import Tree
from d2mtl.tasks import TASKS

TRAINVAL = "trainval"  # an official training part: the stage carves "val" out of it by sample id


@dataclass(slots=True)
class Entry:
    path: str  # source path relative to the dataset root (the sample_id key); "file.csv#row=N" for CSV rows
    source_uri: str
    labels: dict[str, float | int] = field(default_factory=dict)  # task (or age_low / age_high) -> value
    split: str | None = None  # train | val | test | trainval; None: the stage hashes one
    subject: str | None = None
    reject: str | None = None  # reason the entry cannot be used (a report row)
    detail: str = ""
    notes: list[str] = field(default_factory=list)  # kept, but something was missing (counted in the report)


@dataclass(frozen=True)
class Rejected:
    """A payload that could not be read."""

    reason: str
    detail: str = ""


Payload = bytes | np.ndarray | Rejected


class LabelError(ValueError):
    """A label value the registry does not accept; ``reason`` names the report bucket."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def class_code(task: str, value: str | int) -> int:
    """Registry code of a class given as a name or an integer code."""
    spec = TASKS[task]
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        code = int(text)
        try:
            spec.validate(code)
        except ValueError as err:
            raise LabelError("label_out_of_range", str(err)) from None
        return code
    try:
        return spec.code_of(text)
    except ValueError as err:
        raise LabelError("unknown_class", str(err)) from None


def number(task: str, value: str | float) -> float:
    """A regression label, range-checked by the registry."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise LabelError("malformed_label", f"{task} {value!r} is not a number") from None
    try:
        TASKS[task].validate(result)
    except ValueError as err:
        raise LabelError("label_out_of_range", str(err)) from None
    return result


def rejected_entry(path: str, uri: str, error: LabelError) -> Entry:
    return Entry(path, uri, reject=error.reason, detail=str(error))


class Source:
    """One on-disk layout. Subclasses set ``format`` and ``download`` and implement ``entries``."""

    format: ClassVar[str]
    download: ClassVar[str]  # what to download and where to put it, for the "not found" message

    def __init__(self, spec: DatasetSpec, tree: Tree):
        self.spec, self.tree = spec, tree

    def entries(self) -> Iterator[Entry]:
        raise NotImplementedError

    def payloads(self, entries: Iterable[Entry]) -> Iterator[Payload]:
        """Each entry's file bytes, in order; a read failure is a ``Rejected`` payload."""
        for entry in entries:
            try:
                yield self.tree.read(entry.path)
            except FileNotFoundError:
                yield Rejected("missing_file", entry.source_uri)
            except OSError as err:
                yield Rejected("read_error", str(err))


SOURCES: dict[str, type[Source]] = {}


def register(cls: type[Source]) -> type[Source]:
    """Class decorator: make the adapter available under its ``format`` name."""
    SOURCES[cls.format] = cls
    return cls
