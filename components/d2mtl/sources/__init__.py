"""Dataset adapters, one module per on-disk layout, found by format name in ``SOURCES``.

Importing this package registers every adapter; ``d2mtl.config.ingest`` holds the matching
per-format spec models (the ``format`` field picks both).
"""

from d2mtl.sources import (  # noqa: F401  (registers)
    aaf,
    adience,
    appa,
    ckplus,
    fairface,
    fer2013,
    generic,
    jaffe,
    rafdb,
    utkface,
)
from d2mtl.sources.base import SOURCES, TRAINVAL, Entry, Payload, Rejected, Source
from d2mtl.sources.trees import Tree, open_tree

__all__ = ["SOURCES", "TRAINVAL", "Entry", "Payload", "Rejected", "Source", "Tree", "open_tree"]
