"""Pseudo-label (data distillation) stage config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PseudoLabelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = 0.9
