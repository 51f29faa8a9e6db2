"""The chain benchmark: the whole Distill-2MD-MTL chain on real data, then the paper's three claims.

One command runs, through the plain stage functions (the ones ``d2mtl run`` wires):

    ingest (or reuse one)          -> faces/, labels.parquet
    baselines/<task>               single-task networks, one per task (pipeline.baseline_tasks)
    teacher                        the multi-task network on every dataset's labels
    pseudolabel                    the teacher fills in the missing labels
    student                        ground truth + the teacher's pseudo-labels
    pseudolabel_single/<task>      each baseline pseudo-labels its own task
    student_single/<task>          ground truth + the baseline's pseudo-labels, one task
    evaluate                       every model on the test split (+ the configured domain views), claims

then prints the claims table and appends it, with the command, the profile and the stage times, to
BENCHMARKS.md. Every training run uses the profile's settings with ``epoch_samples`` set to ``--train-fraction``
of its own labelled train faces, so all models get the same share of an epoch of their data.

    .venv/bin/python bench/chain_bench.py --data-root ../shared/data --ingest /work/runs/ingest-full
    .venv/bin/python bench/chain_bench.py --smoke     # generated tiny data in the real layouts, ~a minute

(``--smoke`` data: tests/generated/layouts.py, the generator the pipeline tests use.)

A rerun with the same ``--out`` continues: finished training runs are kept (the engine resumes from its
checkpoints), finished pseudo-label tables are reused; evaluate always runs again. With
``pseudolabel.holdout.fraction > 0`` every network trains on the label table minus the hidden labels, and
the evaluation uses the full one.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from d2mtl import claims, contracts, layout, store
from d2mtl.config import ExperimentConfig, load_experiment
from d2mtl.config.train import TrainConfig
from d2mtl.data import FaceIndex
from d2mtl.stages import evaluate, ingest, pseudolabel, student, teacher

log = logging.getLogger("chain_bench")
REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
SECTION = "## Chain benchmark: the paper's claims (bench/chain_bench.py)"
# The cpu profile's 5 epochs over each run's own faces add up to ~1.26M training images for the ten runs (teacher
# and student 192k each, baselines 320k, single-task students ~560k with half of the other dataset pseudo-
# labelled): ~2 h at ~170 img/s. Half of that, plus ~15 min of range tests, validation, five pseudo-label
# passes over 48k faces and the evaluation, is ~80-90 minutes on a quiet 2-core machine.
DEFAULT_TRAIN_FRACTION = 0.5

# Tiny, fast settings for --smoke: generated faces are trusted crops, networks are 32 px and untrained.
SMOKE_OVERRIDES = [
    "ingest.datasets=[{format: utkface, alignment: trust_crop}, {format: fer2013_folder, alignment: trust_crop}]",
    "ingest.image_size=32",
    "ingest.workers=1",
    *(
        f"{section}.{setting}"
        for section in ("teacher", "student")
        for setting in (
            "model.weights=none",
            "model.input_size=32",
            "epochs=1",
            "batch_size=16",
            "lr.range_test=false",
            "num_workers=0",
            "progress=false",
            "threads=2",
            "eval_batch_size=64",
        )
    ),
    "evaluate.fairness_min_group=2",
]


class Timer:
    """Wall seconds per step, in the order run."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float, str]] = []

    def __call__(self, name: str, fn: Callable[[], object], reused: bool = False):
        if reused:
            log.info("== %s: reusing the existing output", name)
            self.steps.append((name, 0.0, "reused"))
            return None
        log.info("== %s", name)
        started = time.perf_counter()
        result = fn()
        self.steps.append((name, time.perf_counter() - started, ""))
        log.info("== %s done in %.0f s", name, self.steps[-1][1])
        return result

    def markdown(self) -> str:
        lines = ["| step | wall time |", "|---|---|"]
        lines += [f"| {name} | {note or f'{seconds / 60:.1f} min'} |" for name, seconds, note in self.steps]
        total = sum(seconds for _, seconds, _ in self.steps)
        return "\n".join([*lines, f"| **total** | **{total / 60:.1f} min** |"])


def train_share(cfg: TrainConfig, faces: str, labels: str, fraction: float, pseudo: str | None = None) -> TrainConfig:
    """``cfg`` with ``epoch_samples`` = ``fraction`` of the run's own labelled train faces (pseudo-labels too)."""
    if fraction == 1.0:
        return cfg
    if cfg.epoch_samples is not None:
        rows = cfg.epoch_samples
    else:
        index = FaceIndex.load(faces, labels, cfg.task_names)
        if pseudo is not None:
            student.apply_pseudo_labels(
                index, contracts.read_table(pseudo, contracts.PSEUDO), np.flatnonzero(index.split == "train"), cfg
            )
        rows = len(index.rows("train"))
    return cfg.model_copy(update={"epoch_samples": max(cfg.batch_size, round(fraction * rows))})


def pseudo_labels(cfg: ExperimentConfig, model: str, faces: str, labels: str, out: str, timer: Timer, name: str) -> str:
    settings = cfg.pseudolabel.model_copy(update={"tasks": contracts.read_model_card(model).tasks})
    table = store.join(out, layout.PSEUDO_FILE)
    timer(
        name,
        lambda: pseudolabel.run(settings, teachers=[model], faces=faces, labels=labels, out=out),
        reused=store.exists(table),
    )
    return table


def run_chain(
    cfg: ExperimentConfig, out: str, ingest_dir: str | None, fraction: float, timer: Timer, baselines: bool = True
) -> dict:
    """Every stage of the chain (without the single-task networks unless ``baselines``); returns the evaluate
    stage's summary."""
    if ingest_dir is None:
        ingest_dir = store.join(out, "ingest")
        done = store.exists(store.join(layout.faces(ingest_dir), layout.FACES_MANIFEST))
        timer("ingest", lambda: ingest.run(cfg.ingest, ingest_dir), reused=done)
    faces, labels = layout.faces(ingest_dir), layout.labels(ingest_dir)
    train_labels = labels
    if cfg.pseudolabel.holdout.fraction > 0:
        holdout_dir = store.join(out, "holdout")
        train_labels = store.join(holdout_dir, layout.HOLDOUT_LABELS_FILE)
        timer(
            "holdout labels",
            lambda: pseudolabel.write_holdout_labels(cfg.pseudolabel, faces, labels, holdout_dir),
            reused=store.exists(train_labels),
        )
    tasks = list(cfg.pipeline.baseline_tasks) if baselines else []

    def train(name: str, settings: TrainConfig, model_out: str, pseudo: str | None = None, init: str | None = None):
        scaled = train_share(settings, faces, train_labels, fraction, pseudo)
        if pseudo is None:
            timer(name, lambda: teacher.run(scaled, faces=faces, labels=train_labels, out=model_out))
        else:
            timer(
                name,
                lambda: student.run(
                    scaled, faces=faces, labels=train_labels, pseudo=pseudo, out=model_out, teacher=init
                ),
            )
        return model_out

    models = {}
    for task in tasks:
        models[f"baseline_{task}"] = train(
            f"baseline {task}", cfg.teacher.model_copy(update={"tasks": [task]}), store.join(out, "baselines", task)
        )
    models["teacher"] = train("teacher", cfg.teacher, store.join(out, "teacher"))
    pseudo_dir = store.join(out, "pseudolabel")
    pseudo = pseudo_labels(cfg, models["teacher"], faces, labels, pseudo_dir, timer, "pseudolabel")
    models["student"] = train("student", cfg.student, store.join(out, "student"), pseudo, models["teacher"])
    for task in tasks:
        single_pseudo = pseudo_labels(
            cfg,
            models[f"baseline_{task}"],
            faces,
            labels,
            store.join(out, "pseudolabel_single", task),
            timer,
            f"pseudolabel {task}",
        )
        models[f"student_single_{task}"] = train(
            f"student_single {task}",
            cfg.student.model_copy(update={"tasks": [task]}),
            store.join(out, "student_single", task),
            single_pseudo,
            models[f"baseline_{task}"],
        )
    report = store.join(pseudo_dir, layout.PSEUDO_REPORT)
    return timer(
        "evaluate",
        lambda: evaluate.run(
            cfg.evaluate,
            [f"{name}={uri}" for name, uri in models.items()],
            faces=faces,
            labels=labels,
            out=store.join(out, "evaluate"),
            pseudo_reports=[report] if store.exists(report) else [],
        ),
    )


def comparison_markdown(evaluation_out: str) -> str:
    doc = claims_doc(evaluation_out)
    header, rows = doc["comparison"]["header"], doc["comparison"]["rows"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in rows
    ]
    return "\n".join(lines)


def claims_doc(evaluation_out: str) -> dict:
    return json.loads(store.read_text(store.join(evaluation_out, layout.EVAL_CLAIMS)))


def results_markdown(
    command: str, profile: str, overrides: list[str], fraction: float, out: str, timer: Timer, evaluated: dict
) -> str:
    evaluation_out = store.join(out, "evaluate")
    faces = ", ".join(f"{f['dataset']}/{f['split']} {f['faces']}" for f in evaluated["faces"])
    settings = "; ".join(overrides) if overrides else "none"
    return "\n\n".join(
        [
            f"### Run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            f"Command: `{command}`  \nProfile: `{profile}`, overrides: {settings}; train fraction {fraction:g} "
            f"(each training run: epoch_samples = {fraction:g} x its labelled train faces)  \nOutputs: `{out}` "
            f"(report: `{evaluated['report']}`)  \nEvaluated faces: {faces}",
            "Claims (test split; numbers are each task's primary metric: MAE in years, lower is better; accuracy "
            "as a fraction):",
            claims.claims_markdown(claims_doc(evaluation_out)["claims"]),
            "Comparison across models:",
            comparison_markdown(evaluation_out),
            "Stage times:",
            timer.markdown(),
        ]
    )


def append_to_benchmarks(text: str, path: Path = BENCHMARKS) -> None:
    """Add ``text`` at the end of this benchmark's section (created at the end of the file if missing)."""
    existing = path.read_text() if path.exists() else ""
    if SECTION not in existing:
        existing = existing.rstrip("\n") + ("\n\n" if existing else "") + SECTION + "\n"
    start = existing.index(SECTION) + len(SECTION)
    next_section = existing.find("\n## ", start)
    end = len(existing) if next_section < 0 else next_section + 1
    body = existing[:end].rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    path.write_text(body + ("\n" + existing[end:] if end < len(existing) else ""))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu", help="experiment profile or YAML (default: cpu)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable), as for d2mtl",
    )
    parser.add_argument(
        "--data-root", default=str(REPO.parent / "shared" / "data"), help="datasets folder (default ../shared/data)"
    )
    parser.add_argument("--ingest", default=None, help="reuse this ingest output (faces/ + labels.parquet)")
    parser.add_argument("--out", default=None, help="output folder (default runs/chain-bench/<UTC time>)")
    parser.add_argument(
        "--train-fraction",
        type=float,
        default=None,
        help=f"share of an epoch of its own data each training run sees per epoch "
        f"(default {DEFAULT_TRAIN_FRACTION}; 1 in --smoke)",
    )
    parser.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the single-task baselines and their students (claims 1 and 3; default on)",
    )
    parser.add_argument("--smoke", action="store_true", help="generated tiny data + tiny networks (a minute)")
    parser.add_argument(
        "--append",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="append the results to BENCHMARKS.md (default: yes, except with --smoke)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    out = args.out or str(REPO / "runs" / "chain-bench" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    overrides = list(args.overrides)
    data_root = args.data_root
    if args.smoke:
        sys.path.insert(0, str(REPO / "tests"))
        from generated.layouts import learnable_utkface_fer

        data_root = str(learnable_utkface_fer(Path(out) / "data"))
        overrides = SMOKE_OVERRIDES + overrides
    fraction = (
        args.train_fraction if args.train_fraction is not None else (1.0 if args.smoke else DEFAULT_TRAIN_FRACTION)
    )
    if not 0 < fraction <= 10:
        raise SystemExit("--train-fraction must be in (0, 10]")
    cfg = load_experiment(args.config, overrides, data_root=data_root)
    store.configure(cfg.store)
    timer = Timer()
    evaluated = run_chain(cfg, out, args.ingest, fraction, timer, baselines=args.baselines)
    command = shlex.join(["bench/chain_bench.py", *(argv if argv is not None else sys.argv[1:])])
    text = results_markdown(
        command, args.config, args.overrides if not args.smoke else ["--smoke"], fraction, out, timer, evaluated
    )
    print(text)
    if args.append if args.append is not None else not args.smoke:
        append_to_benchmarks(text)
        log.info("appended to %s", BENCHMARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
