"""The evaluation report: one self-contained HTML file (tables + PNG plots embedded as data URIs).

The plots are drawn by ``d2mtl.plots``; the HTML references nothing outside itself.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from dataclasses import dataclass

from d2mtl.claims import HELD, NOT_HELD, format_percent
from d2mtl.plots import Series

_STATUS_CLASS = {HELD: "held", NOT_HELD: "not-held"}
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.held { background: #dff5df; } .not-held { background: #f9dcdc; } .unmeasured { background: #f3f3d8; }
figure { display: inline-block; margin: 0.5em; } figcaption { font-size: 0.85em; text-align: center; }
img { max-width: 100%; }
"""


@dataclass(frozen=True)
class Plot:
    caption: str
    png: bytes


def _numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) JSON object, keyed ``a/b``."""
    found = {}
    for key, value in record.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            found.update(_numbers(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[name] = float(value)
    return found


def _lines(records: list[dict], x_key: str, y_keys: Iterable[str]) -> dict[str, tuple[list[float], list[float]]]:
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for record in records:
        values = _numbers(record)
        for key in y_keys:
            if x_key in values and key in values:
                xs, ys = lines.setdefault(key, ([], []))
                xs.append(values[x_key])
                ys.append(values[key])
    return lines


_CURVE_QUALITIES = ("accuracy", "mae", "retention")


def threshold_series(pseudo_report: dict) -> tuple[Series, dict[str, str]]:
    """Pseudo-label quality on the hidden labels as the selection parameter sweeps, one panel per task and quality.

    Reads the pseudo-label report of a holdout run: ``holdout.curves[task] = {"parameter": name, "curve":
    [{name: value, "accuracy" | "mae": ..., "retention": ...}, ...]}``. Returns the series and each panel's x label.
    """
    series: Series = {}
    xlabels: dict[str, str] = {}
    for task, entry in ((pseudo_report.get("holdout") or {}).get("curves") or {}).items():
        for quality in _CURVE_QUALITIES:
            lines = _lines(entry["curve"], entry["parameter"], [quality])
            if lines:
                series[f"{task}: {quality}"] = lines
                xlabels[f"{task}: {quality}"] = entry["parameter"]
    return series, xlabels


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return f'<td class="num">{value}</td>'
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    if value is None:
        return "<td>-</td>"
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    return f"<td>{html.escape(str(value))}</td>"


def table(header: list[str], rows: Iterable[list], row_classes: Iterable[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    classes = list(row_classes) if row_classes is not None else None
    body = []
    for index, row in enumerate(rows):
        css = f' class="{classes[index]}"' if classes and classes[index] else ""
        body.append(f"<tr{css}>{''.join(_cell(v) for v in row)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figures(plots: list[Plot]) -> str:
    return "".join(
        f'<figure><img alt="{html.escape(p.caption)}" src="{_data_uri(p.png)}">'
        f"<figcaption>{html.escape(p.caption)}</figcaption></figure>"
        for p in plots
    )


def _claims_section(claims: list[dict]) -> str:
    parts = [
        table(
            ["#", "claim", "status", "why"],
            [[c["claim"], c["text"], c["status"], c["reason"]] for c in claims],
            [_STATUS_CLASS.get(c["status"], "unmeasured") for c in claims],
        )
    ]
    for claim in claims:
        if not claim["comparisons"]:
            continue
        parts.append(f"<h3>Claim {claim['claim']}: the numbers</h3>")
        parts.append(
            table(
                [
                    "task",
                    "dataset",
                    "domain",
                    "metric",
                    "model",
                    "value",
                    "reference",
                    "reference value",
                    "better",
                    "relative error reduction",
                ],
                [
                    [
                        c["task"],
                        c["dataset"],
                        c["domain"],
                        c["metric"] + ("" if c["higher_is_better"] else " (lower is better)"),
                        c["model"],
                        c["value"],
                        c["reference"],
                        c["reference_value"],
                        "yes" if c["better"] else "no",
                        format_percent(c["relative_error_reduction"]),
                    ]
                    for c in claim["comparisons"]
                ],
                ["held" if c["better"] else "not-held" for c in claim["comparisons"]],
            )
        )
    return "".join(parts)


def _why_no_gaps(grouped: list[dict], min_group: int) -> str:
    if not grouped:
        return "No dataset with gender or race labels among the evaluated ones."
    return (
        f"No gap computed: no attribute has two groups with at least {min_group} labelled faces "
        f"(evaluate.fairness_min_group); the largest group here has {max(r['n'] for r in grouped)}. "
        "The per-group metrics are in the next section."
    )


def render(
    *,
    title: str,
    models: list[dict],
    claims: list[dict],
    comparison: tuple[list[str], list[list]],
    rows: list[dict],
    gaps: list[dict],
    confusion_plots: list[Plot],
    curve_plots: list[Plot],
    threshold_plots: list[Plot],
    notes: list[str] = (),
    fairness_min_group: int = 1,
) -> str:
    """The whole report as one HTML string; ``fairness_min_group``: the group size the gaps were computed with."""
    overall = [r for r in rows if r["group_by"] is None]
    grouped = [r for r in rows if r["group_by"] is not None]
    model_columns = ["name", "role", "uri", "tasks", "backbone", "input size"]
    sections = [
        ("Models", table(model_columns, [[m.get(k.replace(" ", "_")) for k in model_columns] for m in models])),
        ("The paper's claims", _claims_section(claims)),
        (
            "Comparison across models (primary metric per task)",
            "<p>MAE in years (lower is better); accuracies as fractions.</p>" + table(*comparison),
        ),
        (
            "All metrics",
            table(
                ["model", "task", "dataset", "split", "metric", "value", "n"],
                [[r["model"], r["task"], r["dataset"], r["split"], r["metric"], r["value"], r["n"]] for r in overall],
            ),
        ),
        (
            "Fairness audit: largest gap per metric",
            "<p>Gap = best group minus worst group, in the metric's units, over groups with enough faces.</p>"
            + (
                table(
                    [
                        "model",
                        "task",
                        "dataset",
                        "split",
                        "metric",
                        "by",
                        "gap",
                        "best group",
                        "best",
                        "worst group",
                        "worst",
                        "groups",
                    ],
                    [
                        [
                            g["model"],
                            g["task"],
                            g["dataset"],
                            g["split"],
                            g["metric"],
                            g["group_by"],
                            g["gap"],
                            g["best_group"],
                            g["best"],
                            g["worst_group"],
                            g["worst"],
                            g["groups_compared"],
                        ]
                        for g in gaps
                    ],
                )
                if gaps
                else f"<p>{html.escape(_why_no_gaps(grouped, fairness_min_group))}</p>"
            ),
        ),
        (
            "Fairness audit: every metric per group",
            "<details><summary>show</summary>"
            + table(
                ["model", "task", "dataset", "split", "by", "group", "metric", "value", "n"],
                [
                    [
                        r["model"],
                        r["task"],
                        r["dataset"],
                        r["split"],
                        r["group_by"],
                        r["group"],
                        r["metric"],
                        r["value"],
                        r["n"],
                    ]
                    for r in grouped
                ],
            )
            + "</details>",
        ),
        ("Confusion matrices", _figures(confusion_plots) or "<p>None.</p>"),
        ("Training curves", _figures(curve_plots) or "<p>No training metrics found in the model folders.</p>"),
        (
            "Pseudo-label threshold curves",
            _figures(threshold_plots)
            or "<p>None: they need the pseudo-label report of a holdout run (pseudolabel.holdout.fraction > 0).</p>",
        ),
    ]
    body = "".join(f"<h2>{html.escape(name)}</h2>{content}" for name, content in sections)
    note_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{note_html}{body}</body></html>"
    )
