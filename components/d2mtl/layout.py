"""The object-store layout: where each stage writes what, under its output prefix.

A pipeline run publishes to ``<prefix>/<run_id>/<stage>/``; a stage run alone writes to the
``--out`` it is given. Every path any stage reads or writes is named here and nowhere else.
"""

from __future__ import annotations

from d2mtl.errors import UserError
from d2mtl.store import join

STAGES = (
    "ingest",
    "teacher",
    "baselines",
    "pseudolabel",
    "pseudolabel_single",
    "student",
    "student_single",
    "evaluate",
)  # the published stage folders; the *_single ones: the single-task distillation variant

# ingest/
FACES_DIR = "faces"  # sharded face table + _manifest.json (contracts.FaceTableWriter)
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
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return join(prefix, run_id, stage)
