"""Training config shared by the teacher, the single-task baselines and the student."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] | None = None  # None: every task in the registry; [age]: a single-task baseline
    epochs: int = 3


class StudentConfig(TrainConfig):
    pseudo_weight: float = 1.0
