"""Ingest stage config (owned by the ingest stage; see d2mtl/stages/ingest.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_root: str = "./data"  # folder, s3:// prefix; dataset paths are relative to it
    image_size: int = 112  # aligned face side in pixels
