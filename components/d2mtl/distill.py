"""Data distillation maths: aggregate multi-transform teacher predictions, select pseudo-labels, hide labels.

Radosavovic et al., "Data Distillation: Towards Omni-Supervised Learning" (CVPR 2018): run the teacher on
several geometric transforms of each image (and optionally several teachers), average the predictions, and
keep only the confident ones as labels for the student. Distill-2MD-MTL (arXiv 1907.03402) uses it to fill the
tasks each dataset leaves unlabelled.

Everything here is a pure function over NumPy arrays or Arrow tables; the pseudo-label stage does the I/O.
Arrays are indexed by row in canonical order (sorted by ``sample_id``), so ties break the same way every run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from d2mtl import contracts
from d2mtl.tasks import get_task


@dataclass(frozen=True)
class TaskPrediction:
    """One task's aggregated teacher prediction for B rows."""

    value: np.ndarray  # (B,) class code (classification) or expected age in years (regression)
    score: np.ndarray  # (B,) confidence = top mean probability (higher is surer) | spread in years (lower is surer)
    probs: np.ndarray | None = None  # (B, C) mean class probabilities; None for regression


@dataclass(frozen=True)
class Selection:
    kept: np.ndarray  # (B,) bool
    thresholds: dict = field(default_factory=dict)  # what the rule used, for the report


def aggregate_classification(probs: np.ndarray) -> TaskPrediction:
    """Mean class probabilities over members (transforms x teachers): (M, B, C) -> label, confidence, probs."""
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise ValueError(f"expected probabilities shaped (members, rows, classes), got {probs.shape}")
    mean = probs.mean(axis=0, dtype=np.float64).astype(np.float32)  # (B, C)
    return TaskPrediction(value=mean.argmax(axis=1), score=mean.max(axis=1), probs=mean)


def aggregate_regression(values: np.ndarray) -> TaskPrediction:
    """Mean of the members' expected values and their spread (population std): (M, B) -> value, spread."""
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"expected values shaped (members, rows), got {values.shape}")
    values = values.astype(np.float64)
    return TaskPrediction(value=values.mean(axis=0).astype(np.float32), score=values.std(axis=0).astype(np.float32))


def concatenate(parts: list[TaskPrediction]) -> TaskPrediction:
    """Row-wise concatenation of one task's predictions (e.g. of successive batches)."""
    probs = np.concatenate([p.probs for p in parts]) if parts[0].probs is not None else None
    return TaskPrediction(
        value=np.concatenate([p.value for p in parts]), score=np.concatenate([p.score for p in parts]), probs=probs
    )


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class frequencies of the known labels (integer codes); ValueError when there are none."""
    if labels.size == 0:
        raise ValueError("no known labels to take a class prior from")
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes)[:num_classes]
    return counts / counts.sum()


def select_fixed(pred: TaskPrediction, candidate: np.ndarray, threshold: float) -> Selection:
    """Keep candidates whose confidence is at least ``threshold``."""
    return Selection(candidate & (pred.score >= threshold), {"threshold": threshold})


def select_spread(pred: TaskPrediction, candidate: np.ndarray, max_spread: float) -> Selection:
    """Keep candidates whose spread across members is at most ``max_spread``."""
    return Selection(candidate & (pred.score <= max_spread), {"max_spread": max_spread})


def class_quotas(total: int, prior: np.ndarray) -> np.ndarray:
    """Split ``total`` across classes in proportion to ``prior`` (largest remainder: the quotas sum to total)."""
    exact = total * prior
    quota = np.floor(exact).astype(np.int64)
    remainder = exact - quota
    order = np.argsort(-remainder, kind="stable")  # ties go to the lower class code
    quota[order[: total - quota.sum()]] += 1
    return quota


def select_prior(
    pred: TaskPrediction,
    candidate: np.ndarray,
    prior: np.ndarray,
    retention: float,
    classes: list[str] | tuple[str, ...],
) -> Selection:
    """Per-class thresholds so that the kept labels follow ``prior`` and keep ``retention`` of the candidates.

    The quota of class c is its prior share of round(retention x candidates); the most confident candidates
    predicted as c fill it. A class with fewer candidates than its quota keeps all of them and the shortfall is
    not moved to other classes, so the kept labels never over-represent a class the teacher over-predicts.
    """
    kept = np.zeros_like(candidate)
    quota = class_quotas(round(retention * int(candidate.sum())), prior)
    per_class = {}
    for code, name in enumerate(classes):
        rows = np.flatnonzero(candidate & (pred.value == code))
        chosen = rows[np.argsort(-pred.score[rows], kind="stable")[: quota[code]]]
        kept[chosen] = True
        per_class[name] = float(pred.score[chosen].min()) if chosen.size else None
    return Selection(
        kept,
        {
            "retention_target": retention,
            "per_class": per_class,
            "quota": dict(zip(classes, quota.tolist(), strict=True)),
        },
    )


def select(
    task_name: str,
    rule: str,
    parameter: float,
    pred: TaskPrediction,
    candidate: np.ndarray,
    known: np.ndarray | None = None,
) -> Selection:
    """Apply ``rule`` (fixed, prior or spread) with its ``parameter`` (threshold, retention or max spread);
    ``known`` (the codes of the task's known labels) feeds the prior rule."""
    task = get_task(task_name)
    if rule == "spread":
        return select_spread(pred, candidate, parameter)
    if rule == "fixed":
        return select_fixed(pred, candidate, parameter)
    try:
        prior = class_prior(known if known is not None else np.empty(0), task.num_classes)
    except ValueError:
        raise ValueError(
            f"{task_name}: the prior rule needs known {task_name} labels to take the class prior "
            "from and there are none; use rule: fixed"
        ) from None
    return select_prior(pred, candidate, prior, parameter, task.classes)


def _hash_key(seed: int, sample_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{sample_id}".encode(), digest_size=8).digest(), "big")


def hide_labels(
    labels: pa.Table, fraction: float, tasks: list[str] | tuple[str, ...], seed: int = 0
) -> tuple[pa.Table, pa.Table]:
    """Hide ``fraction`` of each task's known labels: (labels to train on, the hidden truth).

    For each task, of the rows that have the label, the round(fraction x n) rows with the smallest
    hash(seed, sample_id) lose it. The choice depends only on the sample ids, not on row order, and a row
    hidden at one fraction is hidden at every larger one. Hiding age also hides the row's age-group interval.
    Both tables keep ``labels``' schema; the hidden truth holds only rows with at least one hidden label.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    for name in tasks:
        get_task(name)
    keys = np.array(
        [_hash_key(seed, sample_id) for sample_id in labels.column("sample_id").to_pylist()], dtype=np.uint64
    )
    moved = {}
    for name in tasks:
        known = np.flatnonzero(labels.column(name).is_valid().to_numpy(zero_copy_only=False))
        hidden = np.zeros(labels.num_rows, dtype=bool)
        hidden[known[np.argsort(keys[known], kind="stable")[: round(fraction * known.size)]]] = True
        for column in [name] + (["age_low", "age_high"] if name == "age" else []):
            moved[column] = hidden
    return contracts.split_label_cells(labels, moved)


CURVE_KEY = {"fixed": "threshold", "prior": "retention_target", "spread": "max_spread"}  # a rule's parameter, by name


def holdout_point(task_name: str, kept: np.ndarray, pred: TaskPrediction, truth: np.ndarray) -> dict:
    """How good the kept pseudo-labels are on the rows whose label was hidden (``truth`` is NaN elsewhere)."""
    hidden = ~np.isnan(truth)
    chosen = kept & hidden
    point = {
        "hidden": int(hidden.sum()),
        "kept": int(chosen.sum()),
        "retention": float(chosen.sum() / hidden.sum()) if hidden.any() else None,
    }
    if get_task(task_name).kind == "classification":
        point["accuracy"] = float(np.mean(pred.value[chosen] == truth[chosen])) if chosen.any() else None
    else:
        point["mae"] = float(np.mean(np.abs(pred.value[chosen] - truth[chosen]))) if chosen.any() else None
    return point


def holdout_curve(
    task_name: str,
    rule: str,
    pred: TaskPrediction,
    candidate: np.ndarray,
    known: np.ndarray | None,
    truth: np.ndarray,
    values: list[float],
) -> list[dict]:
    """Pseudo-label quality on the hidden rows as ``rule``'s parameter sweeps ``values``."""
    curve = []
    for value in values:
        kept = select(task_name, rule, value, pred, candidate, known).kept
        curve.append({CURVE_KEY[rule]: value, **holdout_point(task_name, kept, pred, truth)})
    return curve
