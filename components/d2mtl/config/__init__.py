"""The experiment config: one YAML, one pydantic model per stage, unknown fields refused.

Each stage's model lives in its own module of this package (``ingest``, ``train``,
``pseudolabel``, ``evaluate``, ``pipeline``); this module composes them and loads YAML.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from d2mtl.config.evaluate import EvaluateConfig
from d2mtl.config.ingest import IngestConfig
from d2mtl.config.pipeline import PipelineConfig
from d2mtl.config.pseudolabel import PseudoLabelConfig
from d2mtl.config.train import StudentConfig, TrainConfig
from d2mtl.errors import UserError
from d2mtl.store import StoreSettings

__all__ = [
    "PROFILES",
    "ConfigError",
    "EvaluateConfig",
    "ExperimentConfig",
    "IngestConfig",
    "PipelineConfig",
    "PseudoLabelConfig",
    "StudentConfig",
    "TrainConfig",
    "load_experiment",
]

PROFILES = ("cpu", "gpu")  # packaged experiments, d2mtl/configs/<name>.yaml
DATA_ROOT_ENV = "D2MTL_DATA_ROOT"


class ConfigError(UserError):
    """A config problem in one line, naming each bad field."""


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "default"  # experiment name: part of run ids and output prefixes
    store: StoreSettings = Field(default_factory=StoreSettings)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    teacher: TrainConfig = Field(default_factory=TrainConfig)
    pseudolabel: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)


def _format_errors(err: ValidationError) -> str:
    """One line naming each bad field, e.g. ``teacher.epochs: Input should be ...``."""
    problems = []
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        problems.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def updated(section: BaseModel, option: str, **fields: Any) -> Any:
    """``section`` with ``fields`` replaced, validated as a config file is (``model_copy(update=...)`` is not);
    ``option`` names where the values came from in the one-line error, e.g. ``--tasks``."""
    try:
        return type(section).model_validate({**section.model_dump(), **fields})
    except ValidationError as err:
        raise ConfigError(f"{option}: {_format_errors(err)}") from None


def _child(node: Any, part: str, dotted: str) -> Any:
    """The entry ``part`` of a section (created when missing) or of a list (``part`` an index)."""
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"--set {dotted}: {part} is not an index of a list of {len(node)}")
        return node[int(part)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {dotted}: {part} is inside a value, not a section or list")
    return node.setdefault(part, {})


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``section.field`` (list entries by index: ``ingest.datasets.0.limit``) in the YAML's dict."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = _child(node, part, dotted)
    if isinstance(node, list):
        _child(node, leaf, dotted)
        node[int(leaf)] = value
    elif isinstance(node, dict):
        node[leaf] = value
    else:
        raise ConfigError(f"--set {dotted}: {parents[-1]} is a value, not a section or list")


def read_yaml(path: str) -> dict[str, Any]:
    """A packaged profile name (``cpu``, ``gpu``) or a YAML file path, as a dict."""
    if path in PROFILES:
        text = resources.files("d2mtl.configs").joinpath(f"{path}.yaml").read_text()
    else:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(
                f"cannot read config {path}: {err.strerror}; --config takes a YAML file or a "
                f"packaged profile: {', '.join(PROFILES)}"
            ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def load_experiment(
    path: str | None = None, overrides: list[str] | tuple[str, ...] = (), data_root: str | None = None
) -> ExperimentConfig:
    """Load an experiment (default: the packaged CPU profile) with ``key.sub=value`` overrides.

    The data root comes from, in order: ``data_root``, ``$D2MTL_DATA_ROOT``, the YAML, ``./data``.
    """
    source = path or "cpu"
    data = read_yaml(source)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    root = data_root or os.environ.get(DATA_ROOT_ENV)
    if root:
        _set_dotted(data, "ingest.data_root", root)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config {source}: {_format_errors(err)}") from None
