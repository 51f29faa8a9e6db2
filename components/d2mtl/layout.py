"""The object-store layout: where each stage writes what, under its output prefix.

A pipeline run publishes to ``<prefix>/<run_id>/<stage>/``; a stage run alone writes to the
``--out`` it is given. Every path any stage reads or writes is named here and nowhere else, and ``STAGES`` is the
one table of the pipeline's stages: what each reads, runs in and publishes (the KFP layer and the pipeline config
read it; it lives here, below both, because its rows name the published folders and files).
"""

from __future__ import annotations

from dataclasses import dataclass

from d2mtl.errors import UserError
from d2mtl.store import join

# ingest/
FACES_DIR = "faces"  # sharded face table + its manifest (contracts.FaceTableWriter)
FACES_MANIFEST = "_manifest.json"  # written last: readers trust only the shards it lists
LABELS_FILE = "labels.parquet"
INGEST_REPORT_JSON = "report.json"
INGEST_REPORT_MD = "report.md"

# teacher/, student/, baselines/<task>/: a model folder
WEIGHTS_FILE = "model.safetensors"  # final weights, load without executing code
MODEL_CARD = "model_card.json"  # tasks, classes, backbone, input size, normalisation, data, metrics
CHECKPOINT_FILE = "checkpoint.pt"  # resumable training state (weights_only-loadable)
TRAIN_METRICS = "metrics.json"  # per-epoch history + the LR schedule chosen
TRAIN_CURVES = "curves.png"
LR_RANGE_PLOT = "lr_range.png"

# pseudolabel/
PSEUDO_FILE = "pseudo.parquet"
PSEUDO_REPORT = "report.json"
PSEUDO_SHARDS_DIR = "shards"  # shard-<i>-of-<n>.parquet before the merge
PSEUDO_HOLDOUT_PLOT = "holdout_curves.png"  # holdout mode: pseudo-label quality against the rule's parameter
HOLDOUT_LABELS_FILE = "holdout_labels.parquet"  # holdout mode: the label table the teacher trains on
HOLDOUT_TRUTH_FILE = "holdout_truth.parquet"  # holdout mode: the labels hidden from it

# evaluate/
EVAL_REPORT_HTML = "report.html"
EVAL_METRICS = "metrics.json"
EVAL_CLAIMS = "claims.json"
EVAL_DETAILS = "evaluation.json"  # every row (per group too), gaps, confusion matrices, coverage, skipped faces
CONFUSION_DIR = "confusion"

# d2mtl run: <run_root>/latest.json records the latest finished run (its final model is predict's default)
LATEST_RUN = "latest.json"

# export/ (d2mtl export --out): the graph, and MODEL_CARD with an "export" section describing its inputs/outputs
ONNX_FILE = "model.onnx"  # the card is also in the ONNX metadata (key MODEL_CARD)
TORCHSCRIPT_FILE = "model.torchscript.pt"  # the card is also an extra file of the archive (name MODEL_CARD)


@dataclass(frozen=True)
class Stage:
    """A published stage folder of the pipeline and what is known of it (one row of ``STAGES``)."""

    name: str
    upstream: tuple[str, ...]  # the stages whose outputs it reads
    image: str  # its image: a key of config.pipeline.StageImages
    resources: str  # its pods' resources: a key of config.pipeline.StageResources
    components: tuple[str, ...]  # the KFP components (d2mtl_pipeline.components) that run its code, in its image
    # the files a complete published output has, relative to its folder (each <task>/ one when per_task): what a
    # rerun checks before importing them; none for evaluate, which every rerun recomputes
    markers: tuple[str, ...] = ()
    per_task: bool = False  # published as <stage>/<task>/, one folder per task of pipeline.baseline_tasks
    switch: str | None = None  # the PipelineConfig flag that turns it on; None: it always runs


def _stages(*stages: Stage) -> dict[str, Stage]:
    return {stage.name: stage for stage in stages}


# the pipeline's stages in topological order (upstream first); the *_single ones: the single-task distillation variant
STAGES = _stages(
    Stage(
        "ingest",
        upstream=(),
        image="ingest",
        resources="ingest",
        components=("ingest_shard", "ingest_merge"),
        markers=(join(FACES_DIR, FACES_MANIFEST), LABELS_FILE),
    ),
    Stage(
        "teacher",
        upstream=("ingest",),
        image="teacher",
        resources="teacher",
        components=("teacher",),
        markers=(MODEL_CARD,),
    ),
    Stage(
        "baselines",
        upstream=("ingest",),
        image="teacher",
        resources="teacher",
        components=("baseline",),
        markers=(MODEL_CARD,),
        per_task=True,
        switch="baselines",
    ),
    Stage(
        "pseudolabel",
        upstream=("ingest", "teacher"),
        image="pseudolabel",
        resources="pseudolabel",
        components=("pseudolabel_shard", "pseudolabel_merge", "holdout"),  # holdout: the pseudolabel stage module
        markers=(PSEUDO_FILE,),
    ),
    Stage(
        "pseudolabel_single",
        upstream=("ingest", "baselines"),
        image="pseudolabel",
        resources="pseudolabel",
        components=("pseudolabel_single",),
        markers=(PSEUDO_FILE,),
        per_task=True,
        switch="single_distill",
    ),
    Stage(
        "student",
        upstream=("ingest", "teacher", "pseudolabel"),
        image="student",
        resources="student",
        components=("student",),
        markers=(MODEL_CARD,),
    ),
    Stage(
        "student_single",
        upstream=("ingest", "baselines", "pseudolabel_single"),
        image="student",
        resources="student",
        components=("student_single",),
        markers=(MODEL_CARD,),
        per_task=True,
        switch="single_distill",
    ),
    Stage(
        "evaluate",
        upstream=("ingest", "teacher", "pseudolabel", "student", "baselines", "student_single"),
        image="evaluate",
        resources="evaluate",
        components=("evaluate",),
    ),
)


def faces(ingest_out: str) -> str:
    return join(ingest_out, FACES_DIR)


def labels(ingest_out: str) -> str:
    return join(ingest_out, LABELS_FILE)


def check_shard(index: int, count: int) -> None:
    """Shard ``index`` of ``count`` (a stage's ``shard=(i, n)``, the CLI's ``--shard i/n``) must exist."""
    if count < 1 or not 0 <= index < count:
        raise UserError(f"shard {index}/{count}: expected 0 <= i < n")


def pseudo_shard(index: int, count: int) -> str:
    """A pseudo-label shard's file, relative to the shard run's output prefix."""
    return join(PSEUDO_SHARDS_DIR, f"shard-{index:05d}-of-{count:05d}.parquet")


def stage_prefix(prefix: str, run_id: str, stage: str) -> str:
    """A stage's published folder ``<prefix>/<run_id>/<stage>``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return join(prefix, run_id, stage)
