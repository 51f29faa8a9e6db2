"""Choosing a profile's training settings on the val split: teacher variants trained on one ingest, scored per
task x dataset.

``--model NAME=URI`` adds a model trained elsewhere (e.g. the students of two profiles, on the test split).
Each ``--variant NAME=KEY=VALUE[;KEY=VALUE...]`` is the profile plus the common ``--set`` overrides plus its own
(keys as in ``--set``, e.g. ``teacher.mix_temperature=2;teacher.weighting=fixed``). Every variant trains a teacher
(a rerun with the same ``--work`` resumes or keeps finished runs), then one evaluate pass scores all of them on
the val split (never test: these numbers choose settings). Prints a Markdown table: per variant, the primary
metric of every task x dataset, the mean relative error against the first variant, and minutes per epoch.

    .venv/bin/python bench/profile_bench.py --ingest /work/runs/ingest5 --work /work/runs/variants \\
        --set teacher.epochs=1 --set teacher.epoch_samples=16000 \\
        --variant proportional="teacher.mix=proportional" --variant t2="teacher.mix_temperature=2"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from d2mtl import contracts, layout, store
from d2mtl.claims import headline
from d2mtl.config import load_experiment
from d2mtl.metrics import error_of
from d2mtl.roles import NO_ROLE
from d2mtl.stages import evaluate, teacher


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, settings = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=KEY=VALUE[;KEY=VALUE...]")
    return name, [item for item in settings.split(";") if item]


def train_variants(args: argparse.Namespace) -> dict[str, dict]:
    faces, labels = layout.faces(args.ingest), layout.labels(args.ingest)
    results = {}
    for name, uri in map(evaluate.split_model_arg, args.model):
        training = contracts.read_model_card(uri).training
        results[name or uri] = {
            "out": uri,
            "settings": [],
            "minutes_per_epoch": training.train_seconds / 60 / max(training.epochs, 1),
        }
    for name, settings in map(parse_variant, args.variant):
        cfg = load_experiment(args.config, [*args.overrides, *settings]).teacher
        out = store.join(args.work, name)
        result = teacher.run(cfg, faces=faces, labels=labels, out=out)
        results[name] = {
            "out": out,
            "settings": settings,
            "minutes_per_epoch": result["train_seconds"] / 60 / max(result["epochs"], 1),
        }
    return results


def table(results: dict[str, dict], rows: list[dict], split: str) -> str:
    best = headline(rows, split)
    columns = sorted({(task, dataset) for (_, task, dataset) in best if "~" not in dataset})
    reference = next(iter(results))
    lines = [
        "| variant | "
        + " | ".join(f"{task} {dataset} ({best_metric(best, task, dataset)})" for task, dataset in columns)
        + " | mean rel. error vs "
        + reference
        + " | min/epoch |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for name, info in results.items():
        cells, changes = [], []
        for task, dataset in columns:
            mine, ref = best.get((name, task, dataset)), best.get((reference, task, dataset))
            cells.append("-" if mine is None else f"{mine[1]:.4g}")
            if mine and ref and error_of(ref[0], ref[1]) > 0:
                changes.append(error_of(mine[0], mine[1]) / error_of(ref[0], ref[1]) - 1)
        change = f"{sum(changes) / len(changes):+.1%}" if changes else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {change} | {info['minutes_per_epoch']:.2f} |")
    return "\n".join(lines)


def best_metric(best: dict, task: str, dataset: str) -> str:
    return next(metric for (_, t, d), (metric, _, _) in best.items() if (t, d) == (task, dataset))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu", help="experiment profile or YAML (default: cpu)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every variant (repeatable)",
    )
    parser.add_argument("--ingest", required=True, help="an ingest output (faces/ + labels.parquet)")
    parser.add_argument("--work", required=True, help="folder of the variants' model folders and the evaluation")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=URI",
        help="an already trained model folder to score with the variants (repeatable; listed first)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE[;...]",
        help="a teacher variant (repeatable); the first model or variant is the reference",
    )
    parser.add_argument("--split", default="val", choices=("val", "test"), help="split to score (default: val)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    results = train_variants(args)
    cfg = load_experiment(args.config, args.overrides).evaluate.model_copy(
        update={
            "splits": [args.split],
            "claims_split": args.split,
            "views": [],
            "roles": dict.fromkeys(results, NO_ROLE),
        }
    )
    out = store.join(args.work, f"evaluate-{args.split}")
    evaluate.run(
        cfg,
        [f"{name}={info['out']}" for name, info in results.items()],
        faces=layout.faces(args.ingest),
        labels=layout.labels(args.ingest),
        out=out,
    )
    rows = json.loads(store.read_text(store.join(out, layout.EVAL_DETAILS)))["rows"]
    markdown = table(results, rows, args.split)
    store.write_text(store.join(args.work, f"variants-{args.split}.md"), markdown + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
