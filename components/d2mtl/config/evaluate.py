"""Evaluate stage config (see d2mtl/stages/evaluate.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from d2mtl.config.fields import Threads
from d2mtl.contracts import SPLITS
from d2mtl.errors import UserError
from d2mtl.roles import NO_ROLE, parse_role
from d2mtl.tasks import TaskMap


class DomainView(BaseModel):
    """A synthetic other-domain copy of some datasets' faces, evaluated as a dataset ``<dataset>~<name>``.

    With only colour UTKFace and gray low-resolution FER2013, no labelled face for age/gender/race comes from
    FER2013's domain; ``utkface~gray48`` (UTKFace test faces made gray and 48 px, as FER2013 faces are) stands
    in for it, so the cross-domain claims are measurable. Views are always cross-domain rows.
    """

    model_config = ConfigDict(extra="forbid")

    name: str  # suffix of the view's dataset name, e.g. gray48
    datasets: list[str] = Field(default_factory=list)  # datasets to view this way; empty: every dataset
    grayscale: bool = False  # average the colour channels
    downscale_to: int | None = Field(None, ge=4)  # shrink the face to this side and back: the detail is lost

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"view name {name!r} must be letters, digits, - or _")
        return name


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    splits: list[str] = ["test"]  # face-table splits to evaluate
    batch_size: int = Field(256, ge=1)  # faces per inference batch
    device: str = "auto"  # auto: cuda when available, else cpu
    threads: Threads = None  # config.fields.Threads
    roles: dict[str, str] = Field(default_factory=dict)  # model name -> teacher | student | baseline:<task> |
    # student_single:<task> | none (scored, left out of the claims); unnamed models get a role from their name
    # (baseline_age, ...) or their card
    claims_split: str = "test"  # the split the claims and the comparison table are judged on
    fairness_min_group: int = Field(
        30, ge=1
    )  # groups with fewer labelled faces are listed but left out of the largest gap
    in_domain: TaskMap[list[str]] | None = None  # task -> datasets that gave training labels for it;
    # None: from the model cards of the teacher and the baselines, else from the label table's train split
    views: list[DomainView] = Field(default_factory=list)  # synthetic cross-domain copies (DomainView)
    max_faces_per_dataset: int | None = Field(None, ge=1)  # a deterministic sample of N faces per dataset x split

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, splits: list[str]) -> list[str]:
        unknown = [s for s in splits if s not in SPLITS]
        if unknown or not splits:
            raise ValueError(f"unknown or empty splits {splits}; known: {', '.join(SPLITS)}")
        return splits

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: dict[str, str]) -> dict[str, str]:
        for name, role in roles.items():
            try:
                known = role == NO_ROLE or parse_role(role) is not None
            except UserError as err:
                raise ValueError(str(err)) from None
            if not known:
                raise ValueError(
                    f"model {name!r}: unknown role {role!r}; roles: teacher, student, baseline:<task>, "
                    f"student_single:<task>, {NO_ROLE}"
                )
        return roles

    @model_validator(mode="after")
    def _claims_split_evaluated(self) -> EvaluateConfig:
        if self.claims_split not in self.splits:
            raise ValueError(f"claims_split {self.claims_split!r} is not among the evaluated splits {self.splits}")
        return self
