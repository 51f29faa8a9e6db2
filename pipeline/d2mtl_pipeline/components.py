"""The KFP components: one thin lightweight component per stage over the plain stage functions.

KFP ships each function's source to its container (``base_image`` per stage from the config,
``install_kfp_package=False``: the images have kfp installed), so every body only imports
``d2mtl_pipeline.steps`` and calls one step; the steps call ``d2mtl.stages``. The same components run
locally through ``kfp.local.SubprocessRunner`` and compile for a cluster.

No ``from __future__ import annotations`` here: KFP reads the artifact annotations at definition time.
"""

from dataclasses import dataclass, fields

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent

from d2mtl import layout
from d2mtl.config.pipeline import StageImages


def ingest_shard(config: str, store: str, shard: int, shards: int, part: Output[Dataset], summary: Output[Metrics]):
    """Ingest one shard of the planned images: read, detect and align the faces, split them, write the tables.

    Args:
        config: the ingest section of the experiment (IngestConfig JSON).
        store: object-store settings (StoreSettings JSON, no keys: those come from the environment).
        shard: this shard's index.
        shards: the number of shards.
        part: this shard's ingest output (faces/, labels.parquet, report.json, report.md).
        summary: this shard's counts and time.
    """
    from d2mtl_pipeline import steps

    steps.main(
        steps.ingest_shard, config=config, store_settings=store, shard=shard, shards=shards, part=part, summary=summary
    )


def ingest_merge(
    parts: Input[list[Dataset]],
    faces: Output[Dataset],
    labels: Output[Dataset],
    report: Output[Markdown],
    summary: Output[Metrics],
):
    """Merge the ingest shards into the face and label tables of one pass (same rows, same order, same files).

    Args:
        parts: the shard outputs.
        faces: the face table (a folder of Parquet shards + _manifest.json).
        labels: the label table (Parquet, one nullable column per task).
        report: counts per dataset x split x task x class and the rejects by reason.
        summary: the same counts as scalars.
    """
    from d2mtl_pipeline import steps

    steps.main(steps.ingest_merge, parts=parts, faces=faces, labels=labels, report=report, summary=summary)


def holdout(
    config: str, faces: Input[Dataset], labels: Input[Dataset], train_labels: Output[Dataset], hidden: Output[Dataset]
):
    """Holdout mode: hide a fraction of the known labels from the teachers, to measure pseudo-labels against them.

    Args:
        config: the pseudolabel section of the experiment (PseudoLabelConfig JSON; its holdout settings).
        faces: the face table (which datasets are evaluation-only).
        labels: the label table.
        train_labels: the label table the teacher and the baselines train on.
        hidden: the hidden labels (the truth the pseudo-label report measures against).
    """
    from d2mtl_pipeline import steps

    steps.main(steps.holdout, config=config, faces=faces, labels=labels, train_labels=train_labels, hidden=hidden)


def teacher(config: str, faces: Input[Dataset], labels: Input[Dataset], model: Output[Model], metrics: Output[Metrics]):
    """Train the multi-task teacher on every dataset together, each task's loss masked where its label is missing.

    Args:
        config: the teacher section of the experiment (TrainConfig JSON).
        faces: the face table.
        labels: the label table.
        model: the model folder (weights, model card, checkpoint, curves).
        metrics: final train/val metrics.
    """
    from d2mtl_pipeline import steps

    steps.main(steps.train, config=config, faces=faces, labels=labels, model=model, metrics=metrics, task="")


def baseline(
    config: str,
    task: str,
    faces: Input[Dataset],
    labels: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train a single-task baseline: the teacher's recipe on one task's labels.

    Args:
        config: the teacher section of the experiment (TrainConfig JSON).
        task: the one task to learn.
        faces: the face table.
        labels: the label table.
        model: the model folder.
        metrics: final train/val metrics.
    """
    from d2mtl_pipeline import steps

    steps.main(steps.train, config=config, faces=faces, labels=labels, model=model, metrics=metrics, task=task)


def shard_plan(shards: int) -> list[int]:
    """The shard indices 0..shards-1 that a fan-out (ingest, pseudo-label) iterates over.

    Args:
        shards: how many shards.
    """
    return list(range(shards))


def pseudolabel_shard(
    config: str,
    teacher: Input[Model],
    faces: Input[Dataset],
    labels: Input[Dataset],
    shard: int,
    shards: int,
    part: Output[Dataset],
    metrics: Output[Metrics],
):
    """Pseudo-label one shard of the faces with the teacher (multi-transform inference).

    Args:
        config: the pseudolabel section of the experiment (PseudoLabelConfig JSON).
        teacher: the teacher model folder.
        faces: the face table.
        labels: the label table (ground truth is never overwritten).
        shard: this shard's index.
        shards: the number of shards.
        part: this shard's predictions (the merge selects over all shards at once).
        metrics: this shard's counts and time.
    """
    from d2mtl_pipeline import steps

    steps.main(
        steps.pseudolabel_shard,
        config=config,
        teacher=teacher,
        faces=faces,
        labels=labels,
        shard=shard,
        shards=shards,
        part=part,
        metrics=metrics,
    )


def pseudolabel_merge(config: str, parts: Input[list[Dataset]], pseudo: Output[Dataset], metrics: Output[Metrics]):
    """Merge the shards into one pseudo-label table in canonical order.

    Args:
        config: the pseudolabel section of the experiment (PseudoLabelConfig JSON).
        parts: the shard outputs.
        pseudo: the pseudo-label folder (pseudo.parquet + report.json).
        metrics: retention per task.
    """
    from d2mtl_pipeline import steps

    steps.main(steps.pseudolabel_merge, config=config, parts=parts, pseudo=pseudo, metrics=metrics)


def pseudolabel_single(
    config: str,
    baselines: Input[Model],
    task: str,
    faces: Input[Dataset],
    labels: Input[Dataset],
    pseudo: Output[Dataset],
    metrics: Output[Metrics],
):
    """Pseudo-label one task with its single-task baseline (the single-task distillation variant).

    Args:
        config: the pseudolabel section of the experiment (PseudoLabelConfig JSON); its tasks become [task].
        baselines: the baselines folder (<task>/ model folders).
        task: the task.
        faces: the face table.
        labels: the label table.
        pseudo: the pseudo-label folder (pseudo.parquet + report.json).
        metrics: retention and time.
    """
    from d2mtl_pipeline import steps

    steps.main(
        steps.pseudolabel_single,
        config=config,
        baselines=baselines,
        task=task,
        faces=faces,
        labels=labels,
        pseudo=pseudo,
        metrics=metrics,
    )


def student(
    config: str,
    faces: Input[Dataset],
    labels: Input[Dataset],
    pseudo: Input[Dataset],
    teacher: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train the student on ground truth + the kept pseudo-labels.

    Args:
        config: the student section of the experiment (StudentConfig JSON).
        faces: the face table.
        labels: the label table.
        pseudo: the pseudo-label folder.
        teacher: the teacher model folder (the starting point when student.init is teacher).
        model: the final model folder.
        metrics: final train/val metrics.
    """
    from d2mtl_pipeline import steps

    steps.main(
        steps.student,
        config=config,
        faces=faces,
        labels=labels,
        pseudo=pseudo.path,
        teacher=teacher.path,
        model=model,
        metrics=metrics,
        task="",
    )


def student_single(
    config: str,
    task: str,
    faces: Input[Dataset],
    labels: Input[Dataset],
    pseudo: Input[Dataset],
    baselines: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train a single-task student on ground truth + its baseline's pseudo-labels.

    Args:
        config: the student section of the experiment (StudentConfig JSON); its tasks become [task].
        task: the task.
        faces: the face table.
        labels: the label table.
        pseudo: the single-task pseudo-label folders (<task>/).
        baselines: the baselines folder (<task>/ model folders; the starting point when student.init is teacher).
        model: the single-task student's model folder.
        metrics: final train/val metrics.
    """
    from d2mtl_pipeline import steps

    steps.main(
        steps.student_single,
        config=config,
        task=task,
        faces=faces,
        labels=labels,
        pseudo=pseudo,
        baselines=baselines,
        model=model,
        metrics=metrics,
    )


def gather_models(items: Input[list[Model]], folder: Output[Model]):
    """The models of a per-task loop in one folder, <task>/ each.

    Args:
        items: single-task model folders.
        folder: <task>/ model folders.
    """
    from d2mtl_pipeline import steps

    steps.main(steps.gather, items=items, folder=folder)


def gather_pseudo(items: Input[list[Dataset]], folder: Output[Dataset]):
    """The pseudo-label folders of a per-task loop in one folder, <task>/ each.

    Args:
        items: single-task pseudo-label folders.
        folder: <task>/ pseudo-label folders.
    """
    from d2mtl_pipeline import steps

    steps.main(steps.gather, items=items, folder=folder)


def evaluate(
    config: str,
    confusion_task: str,
    faces: Input[Dataset],
    labels: Input[Dataset],
    teacher: Input[Model],
    student: Input[Model],
    evaluation: Output[Artifact],
    report: Output[HTML],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    claims: Output[Markdown],
    baselines: Input[Model] = None,
    single_students: Input[Model] = None,
    pseudo: Input[Dataset] = None,
):
    """Score every model per task x dataset x split, audit fairness, judge the paper's claims, write the report.

    Args:
        config: the evaluate section of the experiment (EvaluateConfig JSON).
        confusion_task: the task whose student confusion matrix the KFP UI shows.
        faces: the face table.
        labels: the label table.
        teacher: the teacher model folder.
        student: the student model folder.
        evaluation: metrics.json, claims.json, evaluation.json, confusion/ and report.html.
        report: the self-contained HTML report.
        metrics: every scalar metric.
        confusion: the student's confusion matrix for confusion_task.
        claims: the paper's three claims, held or not, with their numbers.
        baselines: the single-task baselines (<task>/ model folders), when trained.
        single_students: the single-task distilled students (<task>/ model folders), when trained.
        pseudo: the teacher's pseudo-label folder, for its threshold curves (holdout runs).
    """
    from d2mtl_pipeline import steps

    steps.main(
        steps.evaluate,
        config=config,
        confusion_task=confusion_task,
        faces=faces,
        labels=labels,
        teacher=teacher,
        student=student,
        baselines=baselines,
        single_students=single_students,
        pseudo=pseudo,
        evaluation=evaluation,
        report=report,
        metrics=metrics,
        confusion=confusion,
        claims=claims,
    )


def publish(store: str, source: Input[Artifact], prefix: str, run: str, job: str, stage: str, name: str) -> str:
    """Copy an artifact to <prefix>/<run>/<stage>/<name> (object storage or a folder); returns that URI.

    Args:
        store: object-store settings (StoreSettings JSON, no keys).
        source: the artifact (a file or a folder).
        prefix: the publish prefix.
        run: the run id to publish under; empty: the KFP run id (job).
        job: the KFP run id.
        stage: the stage folder.
        name: the artifact's name inside it (empty: the stage folder itself).
    """
    from d2mtl_pipeline import steps

    return steps.main(
        steps.publish, store_settings=store, source=source, prefix=prefix, run=run or job, stage=stage, name=name
    )


def deploy(serving: str, image: str, model: str) -> str:
    """Create or update the KServe InferenceService that serves the published student; returns its storageUri.

    Args:
        serving: the serving settings (ServingConfig JSON).
        image: the d2mtl serve image of the predictor.
        model: where the student was published (s3:// or minio://): the InferenceService's storageUri.
    """
    from d2mtl_pipeline import steps

    return steps.main(steps.deploy, serving=serving, image=image, model=model)


@dataclass(frozen=True)
class Components:
    ingest_shard: PythonComponent
    ingest_merge: PythonComponent
    holdout: PythonComponent
    teacher: PythonComponent
    baseline: PythonComponent
    shard_plan: PythonComponent
    pseudolabel_shard: PythonComponent
    pseudolabel_merge: PythonComponent
    pseudolabel_single: PythonComponent
    student: PythonComponent
    student_single: PythonComponent
    gather_models: PythonComponent
    gather_pseudo: PythonComponent
    evaluate: PythonComponent
    publish: PythonComponent
    deploy: PythonComponent


STAGELESS_IMAGES = {  # the components of no stage (layout.STAGES lists the others) -> their image key
    "shard_plan": "utility",  # no torch needed
    "gather_models": "utility",
    "gather_pseudo": "utility",
    "publish": "utility",
    "deploy": "serve",  # the kserve client
}


def build(images: StageImages) -> Components:
    """The components, each in its stage's image (``layout.STAGES``) or in that of ``STAGELESS_IMAGES``."""
    image_keys = {name: stage.image for stage in layout.STAGES.values() for name in stage.components}
    image_keys |= STAGELESS_IMAGES
    return Components(
        **{
            field.name: dsl.component(
                globals()[field.name], base_image=images.reference(image_keys[field.name]), install_kfp_package=False
            )
            for field in fields(Components)
        }
    )
