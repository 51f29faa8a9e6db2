"""The task registry: every face task the network can learn, in one place.

Adding a task means adding one entry to ``TASKS``; the label table, the model heads,
the losses, pseudo-labelling and the metrics all read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator

TaskKind = Literal["classification", "regression"]


@dataclass(frozen=True)
class Task:
    name: str
    kind: TaskKind
    classes: tuple[str, ...] = ()  # class names in code order (classification only)
    value_range: tuple[float, float] | None = None  # valid label range (regression only)
    description: str = ""
    aliases: dict[str, str] = field(default_factory=dict)  # other spellings of class names

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def code_of(self, name: str) -> int:
        """Integer code of a class name (case-insensitive; aliases allowed); ValueError if unknown."""
        key = name.strip().lower()
        key = self.aliases.get(key, key)
        try:
            return self.classes.index(key)
        except ValueError:
            raise ValueError(f"unknown {self.name} class {name!r}; known: {', '.join(self.classes)}") from None

    def validate(self, value: float) -> None:
        """Raise ValueError when ``value`` is not a valid label of this task."""
        if self.kind == "classification":
            if int(value) != value or not 0 <= value < self.num_classes:
                raise ValueError(f"{self.name} code {value!r} out of range 0..{self.num_classes - 1}")
        elif self.value_range is not None:
            low, high = self.value_range
            if not low <= value <= high:
                raise ValueError(f"{self.name} {value!r} out of range {low:g}..{high:g}")


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("age", "regression", value_range=(0.0, 120.0), description="apparent/real age in years"),
        Task(
            "gender",
            "classification",
            ("male", "female"),
            description="binary gender as labelled",
            aliases={"m": "male", "f": "female", "man": "male", "woman": "female"},
        ),
        Task(
            "race",
            "classification",
            ("white", "black", "asian", "indian", "others"),
            description="UTKFace's five race groups",
        ),
        Task(
            "expression",
            "classification",
            ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"),
            description="FER2013's seven basic expressions",
            aliases={
                "anger": "angry",
                "disgusted": "disgust",
                "fearful": "fear",
                "happiness": "happy",
                "sadness": "sad",
                "surprised": "surprise",
            },
        ),
    )
}

AGE_MIN, AGE_MAX = (int(v) for v in TASKS["age"].value_range)  # in whole years: a DEX head has a class per age


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def resolve_tasks(names: list[str] | tuple[str, ...] | None) -> tuple[Task, ...]:
    """Tasks by name in registry order; ``None`` means all of them, an empty list is refused."""
    if names is None:
        return tuple(TASKS.values())
    if not names:
        raise ValueError(f"empty task list; name some of {', '.join(TASKS)} (or leave it out for all)")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")
    return tuple(t for t in TASKS.values() if t.name in names)


def _known_task_names(names: list[str]) -> list[str]:
    resolve_tasks(names)
    return names


def _known_task_keys(mapping: dict) -> dict:
    if mapping:
        resolve_tasks(list(mapping))
    return mapping


Value = TypeVar("Value")
# The one check of task names in configs and on the command line: unknown or no tasks give one line
# (``unknown task(s) X; known tasks: ...``). TaskMap[V]: a mapping keyed by task name.
TaskList = Annotated[list[str], AfterValidator(_known_task_names)]
TaskMap = Annotated[dict[str, Value], AfterValidator(_known_task_keys)]
