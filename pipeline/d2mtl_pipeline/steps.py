"""What each KFP component does inside its container: validate its config, call the stage, fill its artifacts.

The components (components.py) are thin wrappers whose bodies only import this module and call one function,
because KFP ships a lightweight component's source, not the module it sits in. Everything here works on the
artifacts' local paths (``.path``): on a cluster the KFP launcher downloads inputs and uploads outputs.

Each step logs ``stage_seconds``, the time spent in the stage function itself, so the orchestration overhead of a
whole run can be measured (bench/pipeline_bench.py). A ``Metrics`` artifact is also written to its file, not
only to its metadata: ``kfp.local`` treats an output whose file is missing as a cache miss.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from d2mtl import contracts, layout, store
from d2mtl.errors import UserError

log = logging.getLogger("d2mtl.pipeline")

ConfigT = TypeVar("ConfigT", bound=BaseModel)
StepResult = TypeVar("StepResult")
STAGE_SECONDS = "stage_seconds"  # metric every step logs: wall time of the stage function alone


# ---- helpers shared by the steps -------------------------------------------------------------------


def validate(model: type[ConfigT], config_json: str, what: str) -> ConfigT:
    """A stage config from its JSON parameter, with the config's own one-line-per-field errors."""
    try:
        return model.model_validate_json(config_json)
    except ValidationError as err:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg']}" for e in err.errors()]
        raise UserError(f"invalid {what} config: " + "; ".join(lines)) from None


def configure_store(store_json: str) -> None:
    """Object-store connection from the ``store`` parameter; the keys come from the environment (a Secret)."""
    store.configure(validate(store.StoreSettings, store_json, "store"))


def flat_numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number in nested dicts as ``a/b/c`` -> float (booleans, lists and text left out)."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_numbers(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def log_metrics(artifact, values: dict[str, float]) -> None:
    """Scalars into a KFP ``Metrics`` artifact: its metadata (the UI) and its file (the cache, the published copy)."""
    for name, value in sorted(values.items()):
        artifact.log_metric(name, value)
    Path(artifact.path).write_text(json.dumps(dict(sorted(values.items())), indent=1))


def log_confusion(artifact, categories: list[str], matrix: list[list[int]]) -> None:
    artifact.log_confusion_matrix(categories, matrix)
    Path(artifact.path).write_text(json.dumps({"categories": categories, "matrix": matrix}))


def model_metadata(model) -> None:
    """Tasks and architecture from the model card, on the ``Model`` artifact (shown in the KFP UI)."""
    card = contracts.read_model_card(model.path)
    model.metadata.update(tasks=card.tasks, backbone=card.backbone, input_size=card.input_size)
    if card.role is not None:
        model.metadata["role"] = card.role


@contextlib.contextmanager
def workdir(next_to: str) -> Iterator[str]:
    """A scratch folder beside an output artifact (same file system, so results move by rename)."""
    parent = os.path.dirname(next_to)
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=".work-", dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def timed(stage: Callable[[], dict]) -> tuple[dict, float]:
    start = time.perf_counter()
    result = stage()
    return result or {}, time.perf_counter() - start


def main(step: Callable[..., StepResult], /, **arguments) -> StepResult:
    """Run a step the way the ``d2mtl`` CLI runs a stage: logging on, a user error as one line and exit code 2.

    A component names every parameter of its step (two artifacts of one type cannot change places unnoticed); a
    name the step does not have, or a parameter left out (even one with a default), is a TypeError before it starts.
    """
    parameters = list(inspect.signature(step).parameters)
    if sorted(arguments) != sorted(parameters):
        raise TypeError(f"{step.__name__} takes {', '.join(parameters)}; called with {', '.join(arguments)}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True
    )
    try:
        return step(**arguments)
    except UserError as err:
        print(f"d2mtl {step.__name__}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ---- the steps ------------------------------------------------------------------------------------


def ingest_shard(config: str, store_settings: str, shard: int, shards: int, part, summary) -> None:
    from d2mtl.config import IngestConfig
    from d2mtl.stages import ingest as stage

    cfg = validate(IngestConfig, config, "ingest")
    configure_store(store_settings)
    result, seconds = timed(lambda: stage.run(cfg, part.path, shard=(shard, shards)))
    log_metrics(summary, {**flat_numbers(result), STAGE_SECONDS: seconds})


def ingest_merge(parts: list, faces, labels, report, summary) -> None:
    from d2mtl.stages import ingest as stage

    with workdir(faces.path) as work:
        result, seconds = timed(lambda: stage.merge([part.path for part in parts], work))
        os.replace(layout.faces(work), faces.path)
        os.replace(layout.labels(work), labels.path)
        os.replace(store.join(work, layout.INGEST_REPORT_MD), report.path)
    log_metrics(summary, {**flat_numbers(result), STAGE_SECONDS: seconds})


def train(config: str, faces, labels, model, metrics, task: str) -> None:
    """The teacher (all configured tasks), or a single-task baseline when ``task`` is set."""
    from d2mtl.config import TrainConfig, updated
    from d2mtl.stages import teacher as stage

    cfg = validate(TrainConfig, config, "teacher")
    if task:
        cfg = updated(cfg, "task", tasks=[task])
    result, seconds = timed(lambda: stage.run(cfg, faces=faces.path, labels=labels.path, out=model.path))
    model_metadata(model)
    log_metrics(metrics, {**flat_numbers(result), STAGE_SECONDS: seconds})


def pseudolabel_shard(config: str, teacher, faces, labels, shard: int, shards: int, part, metrics) -> None:
    from d2mtl.config import PseudoLabelConfig
    from d2mtl.stages import pseudolabel as stage

    cfg = validate(PseudoLabelConfig, config, "pseudolabel")
    result, seconds = timed(
        lambda: stage.run(
            cfg, teachers=[teacher.path], faces=faces.path, labels=labels.path, out=part.path, shard=(shard, shards)
        )
    )
    log_metrics(metrics, {**flat_numbers(result), STAGE_SECONDS: seconds})


def pseudolabel_merge(config: str, parts: list, pseudo, metrics) -> None:
    from d2mtl.config import PseudoLabelConfig
    from d2mtl.stages import pseudolabel as stage

    cfg = validate(PseudoLabelConfig, config, "pseudolabel")
    result, seconds = timed(lambda: stage.merge(cfg, parts=[p.path for p in parts], out=pseudo.path))
    log_metrics(metrics, {**flat_numbers(result), STAGE_SECONDS: seconds})


def pseudolabel_single(config: str, baselines, task: str, faces, labels, pseudo, metrics) -> None:
    """Pseudo-labels for one task from its single-task baseline (``baselines/<task>``), in one shard."""
    from d2mtl.config import PseudoLabelConfig, updated
    from d2mtl.stages import pseudolabel as stage

    cfg = updated(validate(PseudoLabelConfig, config, "pseudolabel"), "task", tasks=[task])
    teacher = member(baselines.path, task)
    result, seconds = timed(
        lambda: stage.run(cfg, teachers=[teacher], faces=faces.path, labels=labels.path, out=pseudo.path)
    )
    log_metrics(metrics, {**flat_numbers(result), STAGE_SECONDS: seconds})


def holdout(config: str, faces, labels, train_labels, hidden) -> None:
    """Holdout mode: the label table the teachers train on (some known labels hidden) and the hidden truth."""
    from d2mtl.config import PseudoLabelConfig
    from d2mtl.stages import pseudolabel as stage

    cfg = validate(PseudoLabelConfig, config, "pseudolabel")
    with workdir(train_labels.path) as work:
        written = stage.write_holdout_labels(cfg, faces.path, labels.path, work)
        os.replace(written["labels"], train_labels.path)
        os.replace(written["hidden_truth"], hidden.path)


def student(config: str, faces, labels, pseudo: str, teacher: str, model, metrics, task: str) -> None:
    """The student on ground truth + kept pseudo-labels (``pseudo``: a pseudo-label folder; ``teacher``: a model
    folder); ``task``: a single-task student of that task only."""
    from d2mtl.config import StudentConfig, updated
    from d2mtl.stages import student as stage

    cfg = validate(StudentConfig, config, "student")
    if task:
        cfg = updated(cfg, "task", tasks=[task])
    result, seconds = timed(
        lambda: stage.run(
            cfg,
            faces=faces.path,
            labels=labels.path,
            pseudo=store.join(pseudo, layout.PSEUDO_FILE),
            out=model.path,
            teacher=teacher,
        )
    )
    model_metadata(model)
    log_metrics(metrics, {**flat_numbers(result), STAGE_SECONDS: seconds})


def student_single(config: str, task: str, faces, labels, pseudo, baselines, model, metrics) -> None:
    """A single-task student from its task's folders of the gathered pseudo-labels and baselines."""
    student(config, faces, labels, member(pseudo.path, task), member(baselines.path, task), model, metrics, task=task)


def single_task(path: str) -> str:
    """The one task of a single-task model folder (its card) or pseudo-label folder (its report)."""
    if store.exists(store.join(path, layout.MODEL_CARD)):
        tasks = contracts.read_model_card(path).tasks
    elif store.exists(store.join(path, layout.PSEUDO_REPORT)):
        tasks = json.loads(store.read_text(store.join(path, layout.PSEUDO_REPORT)))["tasks"]
    else:
        raise UserError(f"{path} has neither {layout.MODEL_CARD} nor {layout.PSEUDO_REPORT}")
    if len(tasks) != 1:
        raise UserError(f"{path} is not single-task (tasks {', '.join(tasks)})")
    return tasks[0]


def gather(items: list, folder) -> None:
    """Per-task outputs of a loop into one folder, ``<task>/`` each (the published layout of that stage)."""
    for item in items:
        shutil.copytree(item.path, os.path.join(folder.path, single_task(item.path)))


def member(folder: str, task: str) -> str:
    """``<folder>/<task>`` of a gathered folder; a clear error when that task is missing."""
    path = store.join(folder, task)
    if not os.path.isdir(path):
        present = sorted(p.name for p in Path(folder).iterdir()) if os.path.isdir(folder) else []
        raise UserError(f"no {task!r} in {folder} (it holds {', '.join(present) or 'nothing'})")
    return path


def evaluation_models(teacher, student, baselines, single_students) -> list[str]:
    """``NAME=path`` items whose names give the evaluate stage each model's role."""
    items = [f"teacher={teacher.path}", f"student={student.path}"]
    for kind, folder in (("baseline", baselines), ("student_single", single_students)):
        if folder is not None:
            items += [f"{kind}_{path.name}={path}" for path in sorted(Path(folder.path).iterdir()) if path.is_dir()]
    return items


def headline_confusion(evaluation_path: str, model: str, task: str, split: str) -> dict | None:
    """The model's confusion matrix for ``task`` on ``split`` over the dataset with the most labelled faces."""
    details = json.loads(store.read_text(store.join(evaluation_path, layout.EVAL_DETAILS)))
    candidates = [c for c in details["confusion"] if c["model"] == model and c["task"] == task and c["split"] == split]
    return max(candidates, key=lambda c: sum(map(sum, c["matrix"])), default=None)


def evaluate(
    config: str,
    confusion_task: str,
    faces,
    labels,
    teacher,
    student,
    baselines,
    single_students,
    pseudo,
    evaluation,
    report,
    metrics,
    confusion,
    claims,
) -> None:
    from d2mtl.config import EvaluateConfig
    from d2mtl.stages import evaluate as stage

    cfg = validate(EvaluateConfig, config, "evaluate")
    models = evaluation_models(teacher, student, baselines, single_students)
    pseudo_reports = [store.join(pseudo.path, layout.PSEUDO_REPORT)] if pseudo is not None else []
    result, seconds = timed(
        lambda: stage.run(
            cfg, models=models, faces=faces.path, labels=labels.path, out=evaluation.path, pseudo_reports=pseudo_reports
        )
    )
    shutil.copyfile(store.join(evaluation.path, layout.EVAL_REPORT_HTML), report.path)
    claims_doc = json.loads(store.read_text(store.join(evaluation.path, layout.EVAL_CLAIMS)))
    Path(claims.path).write_text(claims_doc["markdown"])
    log_metrics(metrics, {**result.get("metrics", {}), STAGE_SECONDS: seconds})
    matrix = headline_confusion(evaluation.path, "student", confusion_task, cfg.claims_split)
    if matrix is None:
        log.warning("no %s confusion matrix for the student on the %s split", confusion_task, cfg.claims_split)
        matrix = {"categories": [], "matrix": []}
    log_confusion(confusion, matrix["categories"], matrix["matrix"])


def deploy(serving: str, image: str, model: str) -> str:
    """Create or update the InferenceService serving the published model folder ``model``; returns its storageUri."""
    from d2mtl import deploy as serving_deploy
    from d2mtl.config.pipeline import ServingConfig

    settings = validate(ServingConfig, serving, "serving")
    scheme, sep, rest = model.partition("://")
    if not sep or scheme not in ("s3", "minio"):
        raise UserError(
            f"deploy serves the published student from object storage; it was published to {model} "
            "(set pipeline.publish_prefix=s3://...)"
        )
    storage_uri = f"s3://{rest}"  # KServe's storage initializer reads minio:// objects through its s3 support
    serving_deploy.apply(serving_deploy.inference_service(settings, image, storage_uri))
    return storage_uri


def published_uri(prefix: str, run: str, stage: str, name: str) -> str:
    """Where ``publish`` puts an artifact: ``<prefix>/<run>/<stage>/<name>`` (name may be empty)."""
    uri = layout.stage_prefix(prefix, run, stage)
    return store.join(uri, name) if name else uri


def publish(store_settings: str, source, prefix: str, run: str, stage: str, name: str) -> str:
    """Copy an artifact (a file or a whole folder) to its published place; returns that URI."""
    configure_store(store_settings)
    destination = published_uri(prefix, run, stage, name)
    root = Path(source.path)
    # a face table's manifest goes last: readers trust only the shards it lists
    files = (
        [root]
        if root.is_file()
        else sorted(
            (p for p in root.rglob("*") if p.is_file()), key=lambda p: (p.name == layout.FACES_MANIFEST, p.as_posix())
        )
    )
    if not files:
        raise UserError(f"nothing to publish at {source.path} (artifact {source.name})")
    for path in files:
        target = destination if path == root else store.join(destination, path.relative_to(root).as_posix())
        store.upload_file(path, target)
    log.info("published %d file(s) to %s", len(files), destination)
    return destination
