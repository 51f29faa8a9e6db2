"""Every figure the library draws, each returned as PNG bytes.

Drawn with matplotlib's object API (``Figure`` + the Agg canvas), never through pyplot's global state, so
rendering is thread-safe and needs no display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from d2mtl.tasks import TASKS

Series = dict[str, dict[str, tuple[list[float], list[float]]]]  # panel -> line label -> (xs, ys)


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _legend(ax, **options) -> None:
    """A legend when something on ``ax`` has a label (matplotlib warns about an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def confusion_matrix(categories: list[str], matrix: list[list[int]], title: str) -> bytes:
    """Rows = true class, columns = predicted; colour = share of the true class, text = counts."""
    counts = np.asarray(matrix, dtype=np.int64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = 1.2 + 0.6 * len(categories)
    figure = Figure(figsize=(side + 1.0, side))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")
    ticks = range(len(categories))
    axes.set_xticks(ticks, categories, rotation=45, ha="right")
    axes.set_yticks(ticks, categories)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=9)
    for (i, j), count in np.ndenumerate(counts):
        axes.text(
            j, i, str(count), ha="center", va="center", fontsize=7, color="white" if shares[i, j] > 0.5 else "black"
        )
    return png(figure)


def line_panels(series: Series, title: str, xlabel: str | Mapping[str, str]) -> bytes | None:
    """Line plots, one panel per entry of ``series`` (up to 3 per row); None when there is nothing to draw."""
    panels = {name: lines for name, lines in series.items() if lines}
    if not panels:
        return None
    columns = min(3, len(panels))
    grid_rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.8 * columns, 3.4 * grid_rows))
    for index, (panel, lines) in enumerate(panels.items()):
        axes = figure.add_subplot(grid_rows, columns, index + 1)
        for label, (xs, ys) in lines.items():
            axes.plot(xs, ys, marker="o", markersize=3, label=label)
        axes.set_title(panel, fontsize=9)
        axes.set_xlabel(xlabel if isinstance(xlabel, str) else xlabel.get(panel, ""))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return png(figure)


def training_curves(history: list[dict], lr_trace: list[float]) -> bytes:
    """Per-task train / val loss, val metrics per epoch, and the learning rate of every step."""
    figure = Figure(figsize=(15, 4))
    loss_ax, acc_ax, lr_ax = figure.subplots(1, 3)
    mae_ax = None
    epochs = [h["epoch"] for h in history]
    tasks = [t for t in TASKS if any(t in h["train"] for h in history)]
    for task in tasks:
        (line,) = loss_ax.plot(
            epochs, [h["train"].get(task, math.nan) for h in history], marker="o", label=f"{task} train"
        )
        loss_ax.plot(
            epochs,
            [h["val"].get(f"{task}_loss", math.nan) for h in history],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"{task} val",
        )
        if TASKS[task].kind == "classification":
            acc_ax.plot(
                epochs,
                [h["val"].get(f"{task}_acc", math.nan) for h in history],
                marker="o",
                color=line.get_color(),
                label=f"{task} accuracy",
            )
        else:
            mae_ax = mae_ax or acc_ax.twinx()
            mae_ax.plot(
                epochs,
                [h["val"].get(f"{task}_mae", math.nan) for h in history],
                marker="s",
                linestyle=":",
                color=line.get_color(),
                label=f"{task} MAE (years, right)",
            )
            mae_ax.legend(fontsize=7, loc="center right")
    loss_ax.set(title="loss per task", xlabel="epoch")
    _legend(loss_ax, fontsize=7)
    acc_ax.set(title="validation metrics", xlabel="epoch", ylabel="accuracy")
    _legend(acc_ax, fontsize=7, loc="upper left")
    lr_ax.plot(range(1, len(lr_trace) + 1), lr_trace, marker="o" if len(lr_trace) < 20 else None)  # a line needs 2
    lr_ax.set(title="learning rate", xlabel="step", yscale="log")
    return png(figure)


def lr_range_test(result: dict) -> bytes:
    """The LR range test: loss against learning rate, its minimum and the chosen peak."""
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    ax.plot(result["lrs"], result["losses"], alpha=0.4, label="loss")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed")
    ax.axvline(result["best_lr"], color="gray", linestyle=":", label=f"minimum {result['best_lr']:.1e}")
    ax.axvline(result["peak"], color="red", linestyle="--", label=f"chosen peak {result['peak']:.1e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test")
    ax.legend(fontsize=8)
    return png(figure)


def holdout_curves(curves: dict) -> bytes:
    """One panel per task: quality of the kept pseudo-labels on the hidden rows against the share kept, one
    line per rule (points labelled with the rule's parameter), the configured rule's point starred."""
    fig = Figure(figsize=(4.5 * len(curves), 3.8))
    axes = fig.subplots(1, len(curves), squeeze=False)
    for ax, (task, info) in zip(axes[0], curves.items(), strict=True):
        quality = "accuracy" if TASKS[task].kind == "classification" else "mae"
        for rule, sweep in {info["rule"]: info, **info["other_rules"]}.items():
            key = sweep["parameter"]
            points = [p for p in sweep["curve"] if p[quality] is not None]
            x, y = [p["retention"] for p in points], [p[quality] for p in points]
            ax.plot(x, y, "o-", markersize=3, label=f"{rule} ({key})")
            for p in points:
                ax.annotate(
                    f"{p[key]:g}", (p["retention"], p[quality]), fontsize=6, xytext=(2, 2), textcoords="offset points"
                )
        chosen = info["chosen"]
        if chosen[quality] is not None:
            ax.plot([chosen["retention"]], [chosen[quality]], "k*", markersize=10, label="configured")
        ax.set_xlim(0, 1.05)
        if quality == "accuracy":
            ax.set_ylim(0, 1.05)
        ax.set_xlabel("share of hidden labels kept")
        ax.set_ylabel("accuracy" if quality == "accuracy" else "MAE (years)")
        ax.set_title(f"{task}: {chosen['hidden']} hidden labels")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)
