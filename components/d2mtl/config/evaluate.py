"""Evaluate stage config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    splits: list[str] = ["test"]
