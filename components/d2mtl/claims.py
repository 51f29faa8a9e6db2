"""The comparison across models and the paper's three claims (Distill-2MD-MTL, arXiv 1907.03402).

Models play roles: ``baseline:<task>`` (a single-task network), ``teacher`` (the multi-task network trained on
ground truth), ``student`` (the multi-task network trained on ground truth + the teacher's pseudo-labels) and
``student_single:<task>`` (a single-task network trained on ground truth + its baseline's pseudo-labels).

Each claim is judged on the overall rows of ``metrics.score`` for one split, task by task on the task's primary
metric (``metrics.PRIMARY_METRICS``), and states the numbers behind it:

1. MTL beats single-task on every task: teacher vs ``baseline:<task>`` on the datasets that label the task.
2. Distillation improves the model, most on other domains: student vs teacher; the mean relative error
   reduction over all rows must be positive and larger on cross-domain rows than on in-domain rows.
3. Distillation on the MTL model beats distillation on single-task models on unlabelled cross-domain data:
   student vs ``student_single:<task>`` on the cross-domain rows of each task.

A row (task, dataset) is *in-domain* when the dataset gave ground-truth labels of that task to training (the
``coverage`` argument), else *cross-domain*. A claim is "held", "not held" (any comparison that goes the wrong
way, ties included), or "not measurable" (a needed model or kind of row is missing).
"""

from __future__ import annotations

from collections.abc import Mapping

from d2mtl.metrics import HIGHER_IS_BETTER, error_of, primary_metric
from d2mtl.roles import Role, index_roles
from d2mtl.tasks import TASKS

HELD, NOT_HELD, NOT_MEASURABLE = "held", "not held", "not measurable"
IN_DOMAIN, CROSS_DOMAIN = "in-domain", "cross-domain"

CLAIM_TEXT = {
    1: "MTL beats single-task on every task",
    2: "distillation improves the model, most on other domains",
    3: "distillation on the MTL model beats distillation on single-task models on unlabelled cross-domain data",
}


def headline(rows: list[dict], split: str) -> dict[tuple[str, str, str], tuple[str, float, int]]:
    """(model, task, dataset) -> (primary metric, value, n) from the overall rows of ``split``."""
    values: dict[tuple[str, str, str], dict[str, tuple[float, int]]] = {}
    for row in rows:
        if row["group_by"] is None and row["split"] == split:
            values.setdefault((row["model"], row["task"], row["dataset"]), {})[row["metric"]] = (row["value"], row["n"])
    result = {}
    for key, metrics in values.items():
        metric = primary_metric(TASKS[key[1]], set(metrics))
        if metric is not None:
            result[key] = (metric, *metrics[metric])
    return result


def _compare(best: dict, task: str, dataset: str, domain: str, model_a: str, model_b: str) -> dict | None:
    """Model a against model b on one (task, dataset); None when either lacks the row or the metrics differ."""
    a, b = best.get((model_a, task, dataset)), best.get((model_b, task, dataset))
    if a is None or b is None or a[0] != b[0]:
        return None
    metric = a[0]
    error_a, error_b = error_of(metric, a[1]), error_of(metric, b[1])
    reduction = (error_b - error_a) / error_b if error_b > 0 else None  # undefined against a perfect reference
    return {
        "task": task,
        "dataset": dataset,
        "domain": domain,
        "metric": metric,
        "higher_is_better": HIGHER_IS_BETTER[metric],
        "model": model_a,
        "value": a[1],
        "n": a[2],
        "reference": model_b,
        "reference_value": b[1],
        "better": error_a < error_b,
        "relative_error_reduction": reduction,
    }


def _domain(coverage: Mapping[str, set[str]], task: str, dataset: str) -> str:
    return IN_DOMAIN if dataset in coverage.get(task, set()) else CROSS_DOMAIN


def _claim(number: int, status: str, reason: str, comparisons: list[dict], **numbers) -> dict:
    return {
        "claim": number,
        "text": CLAIM_TEXT[number],
        "status": status,
        "reason": reason,
        "comparisons": comparisons,
        **numbers,
    }


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def format_percent(value: float | None) -> str:
    """A relative change as a signed percentage; "n/a" when undefined."""
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _losses(comparisons: list[dict]) -> str:
    return "; ".join(
        f"{c['task']} on {c['dataset']}: {c['metric']} {c['value']:.4g} vs {c['reference_value']:.4g}"
        for c in comparisons
        if not c["better"]
    )


def _compare_per_task(
    best: dict, rows: list[tuple[str, str]], domain: str, model: str, references: Mapping[str, str]
) -> tuple[list[dict], list[str]]:
    """``model`` against ``references[task]`` on each (task, dataset) of ``rows``; also the tasks left uncompared."""
    comparisons, missing = [], []
    for task in dict.fromkeys(t for t, _ in rows):
        found = []
        if task in references:
            for dataset in (d for t, d in rows if t == task):
                comparison = _compare(best, task, dataset, domain, model, references[task])
                if comparison is not None:
                    found.append(comparison)
        comparisons += found
        if not found:
            missing.append(task)
    return comparisons, missing


def _rows_of(best: dict, model: str, coverage: Mapping[str, set[str]], domain: str) -> list[tuple[str, str]]:
    rows = {(t, d) for (m, t, d) in best if m == model and _domain(coverage, t, d) == domain}
    return sorted(rows, key=lambda td: (list(TASKS).index(td[0]), td[1]))


def _single_task_models(by_role: dict[str, str], kind: str) -> dict[str, str]:
    return {role.split(":", 1)[1]: model for role, model in by_role.items() if role.startswith(f"{kind}:")}


def claim_mtl_beats_single_task(best: dict, by_role: dict[str, str], coverage: Mapping[str, set[str]]) -> dict:
    teacher = by_role.get("teacher")
    if teacher is None:
        return _claim(1, NOT_MEASURABLE, "no teacher (MTL) model", [])
    teacher_rows = _rows_of(best, teacher, coverage, IN_DOMAIN)
    if not teacher_rows:
        return _claim(
            1,
            NOT_MEASURABLE,
            "the teacher has no in-domain rows (no evaluated dataset labels its tasks in training)",
            [],
        )
    comparisons, missing = _compare_per_task(
        best, teacher_rows, IN_DOMAIN, teacher, _single_task_models(by_role, "baseline")
    )
    numbers = {"missing_tasks": missing}
    if not comparisons:
        return _claim(1, NOT_MEASURABLE, "no single-task baseline to compare the teacher with", [], **numbers)
    if not all(c["better"] for c in comparisons):
        return _claim(1, NOT_HELD, f"a baseline is as good or better: {_losses(comparisons)}", comparisons, **numbers)
    if missing:
        return _claim(
            1,
            NOT_MEASURABLE,
            f"the teacher wins every compared task, but no baseline for {', '.join(missing)}",
            comparisons,
            **numbers,
        )
    return _claim(1, HELD, "the teacher beats the baseline on every task and dataset", comparisons, **numbers)


def claim_distillation_improves(best: dict, by_role: dict[str, str], coverage: Mapping[str, set[str]]) -> dict:
    teacher, student = by_role.get("teacher"), by_role.get("student")
    if teacher is None or student is None:
        return _claim(
            2,
            NOT_MEASURABLE,
            f"needs a teacher and a student; missing "
            f"{' and '.join(r for r in ('teacher', 'student') if r not in by_role)}",
            [],
        )
    comparisons = [
        c
        for (m, t, d) in sorted(best)
        if m == student and (c := _compare(best, t, d, _domain(coverage, t, d), student, teacher)) is not None
    ]
    if not comparisons:
        return _claim(2, NOT_MEASURABLE, "teacher and student share no task x dataset rows", [])
    overall = _mean([c["relative_error_reduction"] for c in comparisons])
    in_domain = _mean([c["relative_error_reduction"] for c in comparisons if c["domain"] == IN_DOMAIN])
    cross = _mean([c["relative_error_reduction"] for c in comparisons if c["domain"] == CROSS_DOMAIN])
    numbers = {
        "mean_error_reduction": overall,
        "mean_error_reduction_in_domain": in_domain,
        "mean_error_reduction_cross_domain": cross,
    }
    summary = (
        f"mean relative error reduction {format_percent(overall)} (in-domain {format_percent(in_domain)}, "
        f"cross-domain {format_percent(cross)})"
    )
    if overall is None:
        return _claim(
            2, NOT_MEASURABLE, "the teacher is perfect on every shared row: nothing to improve", comparisons, **numbers
        )
    if overall <= 0:
        return _claim(2, NOT_HELD, f"the student does not improve on the teacher: {summary}", comparisons, **numbers)
    if in_domain is None or cross is None:
        kind = "cross-domain" if cross is None else "in-domain"
        return _claim(
            2,
            NOT_MEASURABLE,
            f"the student improves ({summary}), but there are no {kind} rows to compare the domains",
            comparisons,
            **numbers,
        )
    if cross <= in_domain:
        return _claim(
            2, NOT_HELD, f"the student improves, but not most on other domains: {summary}", comparisons, **numbers
        )
    return _claim(2, HELD, f"the student improves, most on other domains: {summary}", comparisons, **numbers)


def claim_mtl_distillation_beats_single(best: dict, by_role: dict[str, str], coverage: Mapping[str, set[str]]) -> dict:
    student, singles = by_role.get("student"), _single_task_models(by_role, "student_single")
    if student is None or not singles:
        return _claim(
            3,
            NOT_MEASURABLE,
            "needs the MTL-distilled student and single-task-distilled students; "
            f"missing {'the student' if student is None else 'student_single models'}",
            [],
        )
    cross_rows = _rows_of(best, student, coverage, CROSS_DOMAIN)
    if not cross_rows:
        return _claim(
            3,
            NOT_MEASURABLE,
            "no cross-domain rows (every evaluated dataset gave training labels for the tasks it labels)",
            [],
        )
    comparisons, missing = _compare_per_task(best, cross_rows, CROSS_DOMAIN, student, singles)
    numbers = {"missing_tasks": missing}
    if not comparisons:
        return _claim(
            3,
            NOT_MEASURABLE,
            f"no single-task-distilled student for the cross-domain tasks {', '.join(missing)}",
            [],
            **numbers,
        )
    if not all(c["better"] for c in comparisons):
        return _claim(
            3,
            NOT_HELD,
            f"a single-task-distilled student is as good or better: {_losses(comparisons)}",
            comparisons,
            **numbers,
        )
    if missing:
        return _claim(
            3,
            NOT_MEASURABLE,
            "the MTL-distilled student wins every compared task, but no "
            f"single-task-distilled student for {', '.join(missing)}",
            comparisons,
            **numbers,
        )
    return _claim(
        3,
        HELD,
        "the MTL-distilled student beats every single-task-distilled student on cross-domain data",
        comparisons,
        **numbers,
    )


def assess(
    rows: list[dict], roles: Mapping[str, Role | None], coverage: Mapping[str, set[str]], split: str = "test"
) -> list[dict]:
    """The three claims, each with its status, reason and the comparisons behind it."""
    by_role = index_roles(roles)
    best = headline(rows, split)
    return [
        claim(best, by_role, coverage)
        for claim in (claim_mtl_beats_single_task, claim_distillation_improves, claim_mtl_distillation_beats_single)
    ]


def comparison_table(
    rows: list[dict], models: list[str], split: str, coverage: Mapping[str, set[str]]
) -> tuple[list[str], list[list]]:
    """Header and rows: one line per task x dataset, the primary metric of each model side by side."""
    best = headline(rows, split)
    keys = sorted({(t, d) for (_, t, d) in best}, key=lambda td: (list(TASKS).index(td[0]), td[1]))
    header = ["task", "dataset", "domain", "metric", *models]
    table = []
    for task, dataset in keys:
        metric = next(best[(m, task, dataset)][0] for m in models if (m, task, dataset) in best)
        values = [
            best[(m, task, dataset)][1]
            if (m, task, dataset) in best and best[(m, task, dataset)][0] == metric
            else None
            for m in models
        ]
        table.append([task, dataset, _domain(coverage, task, dataset), metric, *values])
    return header, table


def claims_markdown(claims: list[dict]) -> str:
    """The claims as a Markdown table, numbers included (for BENCHMARKS.md and logs)."""
    lines = ["| # | claim | status | numbers |", "|---|---|---|---|"]
    for claim in claims:
        numbers = (
            "; ".join(
                f"{c['task']}/{c['dataset']} ({c['domain']}) {c['metric']}: {c['model']} {c['value']:.4g} vs "
                f"{c['reference']} {c['reference_value']:.4g}"
                for c in claim["comparisons"]
            )
            or "-"
        )
        lines.append(f"| {claim['claim']} | {claim['text']} | **{claim['status']}**: {claim['reason']} | {numbers} |")
    return "\n".join(lines)
