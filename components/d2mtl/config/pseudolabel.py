"""Pseudo-label (data distillation) stage config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from d2mtl.config.fields import Threads
from d2mtl.tasks import TASKS, TaskList, get_task

TRANSFORM_OPS = ("identity", "hflip", "scale", "crop")  # scale:F resizes to F x input size; crop:F centre-crops F
RULES_BY_KIND = {"classification": ("fixed", "prior"), "regression": ("spread",)}  # selection rules a task may use
RULE_PARAMETER = {"fixed": "threshold", "prior": "retention", "spread": "max_spread"}  # the TaskRule field each uses


def parse_transform(spec: str) -> list[tuple[str, float]]:
    """``"hflip+crop:0.9"`` -> [("hflip", 1.0), ("crop", 0.9)]; ValueError naming what is wrong."""
    ops = []
    for part in spec.split("+"):
        name, _, raw = part.strip().partition(":")
        if name not in TRANSFORM_OPS:
            raise ValueError(f"transform {spec!r}: unknown op {name!r}; ops: identity, hflip, scale:F, crop:F")
        if (name in ("scale", "crop")) != bool(raw):
            raise ValueError(
                f"transform {spec!r}: {name} " + ("needs a factor, e.g. scale:1.25" if not raw else "takes no factor")
            )
        factor = float(raw) if raw else 1.0
        if (name == "scale" and not 0.25 <= factor <= 4.0) or (name == "crop" and not 0.25 <= factor <= 1.0):
            raise ValueError(
                f"transform {spec!r}: {name} factor {factor:g} out of range "
                + ("0.25..4" if name == "scale" else "0.25..1")
            )
        ops.append((name, factor))
    return ops


class TaskRule(BaseModel):
    """How one task's pseudo-labels are selected."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["fixed", "prior", "spread"] = "fixed"  # fixed | prior (classification); spread (regression)
    threshold: float = Field(0.9, ge=0.0, le=1.0)  # fixed: keep when the mean top probability >= this
    retention: float = Field(0.5, gt=0.0, le=1.0)  # prior: share of candidates kept, split by the labelled prior
    max_spread: float = Field(3.0, ge=0.0)  # spread: keep when the std of the members' predictions <= this

    @property
    def parameter(self) -> float:
        """The value of the field this rule uses."""
        return getattr(self, RULE_PARAMETER[self.rule])


def default_rule(task: str) -> TaskRule:
    return TaskRule(rule="spread") if get_task(task).kind == "regression" else TaskRule(rule="fixed")


class HoldoutConfig(BaseModel):
    """Hide known labels from the teacher, then measure the pseudo-labels against them."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.0, ge=0.0, lt=1.0)  # share of each task's known labels hidden; 0 = holdout off
    tasks: TaskList = ["age", "expression"]  # tasks whose labels are hidden (UTKFace age, FER2013 expression)
    seed: int = 0  # which rows are hidden: hash(seed, sample_id)
    thresholds: list[float] = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]  # fixed-rule curve points
    retentions: list[float] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # prior-rule curve points
    max_spreads: list[float] = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]  # spread-rule curve points, years

    def sweep(self, rule: str) -> list[float]:
        return {"fixed": self.thresholds, "prior": self.retentions, "spread": self.max_spreads}[rule]


class PseudoLabelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: TaskList | None = None  # tasks to pseudo-label (None: every registry task); must equal the teacher's
    transforms: list[str] = ["identity", "hflip"]  # test-time views "op[+op...]": identity, hflip, scale:F, crop:F
    batch_size: int = Field(256, ge=1)  # faces per forward pass (each pass runs all transforms)
    workers: int = Field(1, ge=0)  # processes reading + decoding faces while the network runs (0: in-process)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Threads = None  # config.fields.Threads
    rules: dict[str, TaskRule] = {}  # per task; a task not listed: fixed 0.9 (classification), spread 3 (age)
    # per target dataset, task -> rule for that dataset's candidates, where its holdout curves call for another rule
    dataset_rules: dict[str, dict[str, TaskRule]] = {}
    holdout: HoldoutConfig = Field(default_factory=HoldoutConfig)

    @field_validator("transforms")
    @classmethod
    def _valid_transforms(cls, transforms: list[str]) -> list[str]:
        if not transforms:
            raise ValueError("at least one transform is needed, e.g. [identity]")
        if len(set(transforms)) != len(transforms):
            raise ValueError("a transform is listed twice (it would count double in the mean)")
        for spec in transforms:
            parse_transform(spec)
        return transforms

    @model_validator(mode="after")
    def _rules_fit_tasks(self) -> PseudoLabelConfig:
        placed = [(f"rules.{name}", name, rule) for name, rule in self.rules.items()]
        placed += [
            (f"dataset_rules.{dataset}.{name}", name, rule)
            for dataset, rules in self.dataset_rules.items()
            for name, rule in rules.items()
        ]
        for where, name, rule in placed:
            task = get_task(name)
            if rule.rule not in RULES_BY_KIND[task.kind]:
                raise ValueError(
                    f"{where}: rule {rule.rule!r} does not fit a {task.kind} task; use "
                    + " or ".join(RULES_BY_KIND[task.kind])
                )
        return self

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(name for name in TASKS if self.tasks is None or name in self.tasks)

    def rule_for(self, task: str) -> TaskRule:
        return self.rules.get(task) or default_rule(task)
