"""Field types that several stage configs share, so that a setting means the same in every section."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# torch's CPU threads (intra-op) in each process of the stage (under torchrun: in each rank); None: torch's
# default, one per core. The face detector of predict / serve takes the same count (--threads).
Threads = Annotated[int | None, Field(ge=1)]
