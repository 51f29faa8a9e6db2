"""Model roles in the comparison: which model is the teacher, the student, a baseline, a single-task student."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from d2mtl.errors import UserError
from d2mtl.tasks import TASKS

ROLE_KINDS = ("baseline", "teacher", "student", "student_single")
NO_ROLE = "none"  # evaluate.roles: a model scored and compared, but left out of the claims
_ROLE_PATTERN = re.compile(r"^(baseline|students?[_-]single)s?(?:[:_/-](\w+))?$")


@dataclass(frozen=True)
class Role:
    kind: str  # one of ROLE_KINDS
    task: str | None = None  # the task of a single-task role

    def __str__(self) -> str:
        return self.kind if self.task is None else f"{self.kind}:{self.task}"


def parse_role(text: str) -> Role | None:
    """``teacher``, ``student``, ``baseline:age`` (also ``baseline_age``, ``student-single:race``...), else None."""
    key = text.strip().lower()
    if key in ("teacher", "student"):
        return Role(key)
    match = _ROLE_PATTERN.match(key)
    if match is None or match.group(2) is None:
        return None
    kind = "baseline" if match.group(1) == "baseline" else "student_single"
    task = match.group(2)
    if task not in TASKS:
        raise UserError(f"role {text!r} names unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return Role(kind, task)


def index_roles(roles: Mapping[str, Role | None]) -> dict[str, str]:
    """role string -> model name; two models in one role is an error."""
    by_role: dict[str, str] = {}
    for model, role in roles.items():
        if role is None:
            continue
        if str(role) in by_role:
            raise UserError(
                f"models {by_role[str(role)]!r} and {model!r} both have role {role}; "
                "give each role to one model (evaluate.roles in the config, or NAME=URI)"
            )
        by_role[str(role)] = model
    return by_role
