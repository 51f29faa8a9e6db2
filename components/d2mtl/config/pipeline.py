"""Pipeline (KFP wiring, local runs, cluster submission) config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_root: str = "./runs"  # local pipeline root for d2mtl run
