"""Training-stage throughput against bare forward + backward on in-memory tensors.

Both run the same network, loss, task weighting, optimiser and batch size in one process, in
alternating rounds (so a machine whose load changes affects both alike):

- bare: ``Trainer.train_step`` on one batch already in memory (normalised on every step, as the stage does);
- stage: ``Trainer.train_one_epoch`` over the face table: JPEG decode, augmentation, the DataLoader
  worker, the step itself, loss bookkeeping. Each round is an epoch of ``--steps`` batches with a
  fresh plan; one warm-up epoch first starts the (persistent) worker and fills its shard cache, a
  cost paid once per run (about a second here).

The ratio stage / bare is the share of compute speed the data path keeps (goal >= 0.95).

    .venv/bin/python bench/train_bench.py --faces /work/runs/ingest-full/faces \\
        --labels /work/runs/ingest-full/labels.parquet --config cpu
    .venv/bin/python bench/train_bench.py --smoke          # generated tiny tables, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from d2mtl.config import load_experiment
from d2mtl.data import EpochSampler, FaceIndex, make_loader
from d2mtl.engine import Trainer, setup_run
from d2mtl.lr import DynamicLR
from d2mtl.models import build_model

log = logging.getLogger("train_bench")
REPO = Path(__file__).resolve().parents[1]


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """The face / label tables and the teacher settings a training bench runs on."""
    parser.add_argument("--faces", help="face table (default with --smoke: generated)")
    parser.add_argument("--labels", help="label table")
    parser.add_argument("--config", default="cpu", help="experiment profile or YAML (its teacher: section is used)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set teacher.model.input_size=96 (repeatable)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per round and mode")
    parser.add_argument(
        "--rounds",
        type=int,
        default=15,
        help="alternating bare / stage rounds (short rounds, so "
        "that a change of load on the machine hits both modes alike)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny generated tables, 32 px, untrained network")
    return parser.parse_args(argv)


def bench(cfg, faces: str, labels: str, steps: int, rounds: int) -> dict:
    cfg = cfg.model_copy(update={"epoch_samples": steps * cfg.batch_size, "checkpoint_every": 0})
    setup_run(cfg)
    index = FaceIndex.load(faces, labels, cfg.task_names)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as out:
        trainer = Trainer(cfg, index, out, build_model(cfg), role="bench")
        trainer.progress.peak_lr = cfg.lr.lr
        trainer.scheduler = DynamicLR(trainer.optimizer, cfg.lr, cfg.lr.lr, 10**6, 10**6)
        trainer.train_one_epoch(-1)  # warm-up: workers start, shards enter their caches (once per run)
        batch = next(
            iter(make_loader(trainer.train_data, EpochSampler(index, trainer.train_rows, cfg.batch_size, cfg.seed)))
        )
        bare, stage = [], []
        for round_ in range(rounds):
            started = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(batch)
            bare.append(steps * cfg.batch_size / (time.perf_counter() - started))
            trainer.progress.step_in_epoch = 0
            started = time.perf_counter()
            trainer.train_one_epoch(round_)  # a fresh epoch plan each round: shards are read anew
            stage.append(steps * cfg.batch_size / (time.perf_counter() - started))
            log.info(
                "round %d: bare %.1f img/s, stage %.1f img/s, ratio %.3f",
                round_ + 1,
                bare[-1],
                stage[-1],
                stage[-1] / bare[-1],
            )
    ratios = [s / b for s, b in zip(stage, bare, strict=True)]
    return {
        "backbone": cfg.model.backbone,
        "input_size": cfg.model.input_size,
        "batch_size": cfg.batch_size,
        "freeze_stages": cfg.model.freeze_stages,
        "num_workers": cfg.num_workers,
        "threads": cfg.threads,
        "bare_img_s": round(statistics.median(bare), 1),
        "stage_img_s": round(statistics.median(stage), 1),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)] if len(ratios) > 1 else [],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    overrides = list(args.overrides)
    if args.smoke:
        sys.path.insert(0, str(REPO / "tests"))
        from generated.tables import make_tiny_tables

        tables = make_tiny_tables(Path(tempfile.mkdtemp(prefix="train-bench-data-")), per_dataset=96)
        faces, labels = tables["faces"], tables["labels"]
        overrides += ["teacher.model.weights=none", "teacher.model.input_size=32", "teacher.batch_size=16"]
    elif not (args.faces and args.labels):
        raise SystemExit("give --faces and --labels (an ingest output), or --smoke")
    else:
        faces, labels = args.faces, args.labels
    cfg = load_experiment(args.config, overrides).teacher.model_copy(update={"progress": False})
    result = bench(cfg, faces, labels, args.steps, args.rounds)
    print(json.dumps(result))
    return 0 if result["ratio_median"] >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
