"""Evaluation metrics per task x dataset x split, confusion matrices and the fairness audit.

Everything here works on plain arrays aligned row by row:

- ``truth``: one float array per label column of ``contracts.LABEL_SCHEMA`` (a missing label is NaN), plus the
  string arrays ``dataset`` and ``split``;
- ``predictions``: one array per task the model has: predicted class codes for classification tasks, expected
  years for age.

Scores come back as long-format rows (``task, dataset, split, metric, value, n, group_by, group``) so that one
list holds the overall numbers and the per-group numbers of the fairness audit alike.

Age follows the usual reporting of age estimation: MAE in years and CS@5, the share of faces whose error is
at most 5 years (the cumulative score of Geng et al., 2007). Datasets that only label an age group carry the
interval ``age_low``..``age_high`` (inclusive); a prediction inside it counts as correct.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from d2mtl.tasks import TASKS, Task

CS_YEARS = 5.0  # the error bound of CS@5
FAIRNESS_ATTRIBUTES = ("gender", "race")  # ground-truth labels the audit groups by, where a dataset has them

# Metric name -> whether a larger value is better. Every metric a row can carry is listed here.
HIGHER_IS_BETTER = {"mae": False, "cs5": True, "group_accuracy": True, "accuracy": True, "macro_f1": True}
# The headline metric of each kind of task, in order of preference (group_accuracy where only groups exist).
PRIMARY_METRICS = {"regression": ("mae", "group_accuracy"), "classification": ("accuracy",)}


def age_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """MAE in years and CS@5 of predicted against true ages."""
    error = np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64))
    return {"mae": float(error.mean()), "cs5": float((error <= CS_YEARS).mean())}


def interval_accuracy(pred: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    """Share of predictions inside their inclusive interval ``[low, high]``."""
    pred = np.asarray(pred, dtype=np.float64)
    return float(((pred >= low) & (pred <= high)).mean())


def class_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (averaged over the classes present in truth or prediction)."""
    true, pred = np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    return {
        "accuracy": float(accuracy_score(true, pred)),
        "macro_f1": float(f1_score(true, pred, average="macro", zero_division=0)),
    }


def confusion(task: Task, true: np.ndarray, pred: np.ndarray) -> dict:
    """Counts with rows = true class, columns = predicted class, both in registry order.

    The shape KFP's ``ClassificationMetrics.log_confusion_matrix(categories, matrix)`` takes.
    """
    matrix = confusion_matrix(
        np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64), labels=list(range(task.num_classes))
    )
    return {"categories": list(task.classes), "matrix": matrix.tolist()}


def _labelled(column: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    if column is None:
        return np.zeros_like(mask)
    return mask & ~np.isnan(column)


def task_metrics(
    task: Task, truth: Mapping[str, np.ndarray], pred: np.ndarray, mask: np.ndarray
) -> Iterator[tuple[str, float, int]]:
    """(metric, value, n) for every metric of ``task`` that the rows selected by ``mask`` have labels for."""
    have = _labelled(truth.get(task.name), mask)
    if task.kind == "classification":
        if have.any():
            for metric, value in class_scores(truth[task.name][have], pred[have]).items():
                yield metric, value, int(have.sum())
        return
    if have.any():
        for metric, value in age_scores(truth[task.name][have], pred[have]).items():
            yield metric, value, int(have.sum())
    low, high = truth.get(f"{task.name}_low"), truth.get(f"{task.name}_high")
    in_group = _labelled(low, mask & ~have) & _labelled(high, mask)
    if in_group.any():
        yield "group_accuracy", interval_accuracy(pred[in_group], low[in_group], high[in_group]), int(in_group.sum())


def score(
    truth: Mapping[str, np.ndarray],
    predictions: Mapping[str, np.ndarray],
    fairness_by: tuple[str, ...] = FAIRNESS_ATTRIBUTES,
) -> tuple[list[dict], list[dict]]:
    """Score one model on every dataset x split present in ``truth``.

    Returns ``(rows, confusions)``: the overall rows (``group_by`` None), then per fairness attribute and group
    the same metrics on that group's faces; and one confusion matrix per classification task x dataset x split
    with labels. Tasks the model lacks simply have no rows.
    """
    rows: list[dict] = []
    confusions: list[dict] = []
    datasets, splits = np.asarray(truth["dataset"]), np.asarray(truth["split"])
    for dataset, split in sorted(set(zip(datasets.tolist(), splits.tolist(), strict=True))):
        in_slice = (datasets == dataset) & (splits == split)
        where = {"dataset": dataset, "split": split}
        for task in TASKS.values():
            if task.name not in predictions:
                continue
            pred = np.asarray(predictions[task.name])
            for metric, value, n in task_metrics(task, truth, pred, in_slice):
                rows.append(
                    {
                        "task": task.name,
                        **where,
                        "metric": metric,
                        "value": value,
                        "n": n,
                        "group_by": None,
                        "group": None,
                    }
                )
            for attribute in fairness_by:
                for code, group_mask in _groups(TASKS[attribute], truth.get(attribute), in_slice):
                    for metric, value, n in task_metrics(task, truth, pred, group_mask):
                        rows.append(
                            {
                                "task": task.name,
                                **where,
                                "metric": metric,
                                "value": value,
                                "n": n,
                                "group_by": attribute,
                                "group": TASKS[attribute].classes[code],
                            }
                        )
            have = _labelled(truth.get(task.name), in_slice)
            if task.kind == "classification" and have.any():
                confusions.append({"task": task.name, **where, **confusion(task, truth[task.name][have], pred[have])})
    return rows, confusions


def _groups(attribute: Task, column: np.ndarray | None, mask: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    labelled = _labelled(column, mask)
    for code in np.unique(column[labelled]).astype(int) if labelled.any() else ():
        yield int(code), labelled & (column == code)


def fairness_gaps(rows: list[dict], min_group_size: int = 1) -> list[dict]:
    """The largest gap per metric between the groups of one attribute (best group minus worst group).

    Groups with fewer than ``min_group_size`` labelled faces are left out of the gap (their numbers are too
    noisy to accuse a model of bias); ``groups_compared`` says which groups the gap is over. ``gap`` is
    always >= 0 and in the metric's units; ``best_group`` / ``worst_group`` follow the metric's direction.
    """
    by_key: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["group_by"] is not None and row["n"] >= min_group_size:
            key = tuple(row.get(k) for k in ("model", "task", "dataset", "split", "metric", "group_by"))
            by_key.setdefault(key, []).append(row)
    gaps = []
    for (model, task, dataset, split, metric, group_by), group_rows in sorted(by_key.items(), key=_sort_key):
        if len(group_rows) < 2:
            continue
        ranked = sorted(group_rows, key=lambda r: r["value"], reverse=HIGHER_IS_BETTER[metric])
        best, worst = ranked[0], ranked[-1]
        gap = {
            "task": task,
            "dataset": dataset,
            "split": split,
            "metric": metric,
            "group_by": group_by,
            "gap": abs(best["value"] - worst["value"]),
            "best_group": best["group"],
            "best": best["value"],
            "worst_group": worst["group"],
            "worst": worst["value"],
            "groups_compared": [r["group"] for r in ranked],
        }
        gaps.append(gap if model is None else {"model": model, **gap})
    return gaps


def _sort_key(item: tuple) -> tuple:
    return tuple("" if part is None else str(part) for part in item[0])


def primary_metric(task: Task, available: set[str] | list[str]) -> str | None:
    """The headline metric of ``task`` among the metrics a row set has, or None."""
    return next((m for m in PRIMARY_METRICS[task.kind] if m in available), None)


def error_of(metric: str, value: float) -> float:
    """The metric as an error (lower is better, 0 is perfect): MAE itself, else 1 - score."""
    return value if not HIGHER_IS_BETTER[metric] else 1.0 - value
