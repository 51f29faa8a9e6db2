"""Data-parallel training against one process: wall time and loss agreement, same global batch.

Runs the teacher stage twice on the same tables and config, each as its own command so that start-up is
counted as a user sees it: ``d2mtl teacher`` (one process, ``--threads`` threads) and ``torchrun
--nproc-per-node N -m d2mtl.cli teacher`` (N processes, ``--threads / N`` threads each; gloo on CPU, nccl on
GPUs), alternating ``--repeats`` times so that a change of load on the machine hits both alike. Prints, per
mode, the best wall time and the best training time the run itself reports (``metrics.json``), and the largest
difference between the two modes' per-epoch train losses and validation metrics.

On a CPU-only machine expect no speed-up: N processes share the same cores that one process already uses
(and all-reduce on top). On N GPUs, the speed-up is the point. The metrics agree to float rounding only where
BatchNorm is synchronised (GPUs: SyncBatchNorm) or frozen; on CPU each process normalises its own share of the
batch, and the difference printed is that effect (tests/test_distributed.py checks the exact agreement).

    .venv/bin/python bench/distributed_bench.py --smoke                   # generated tables, 64 px, ~1 min
    .venv/bin/python bench/distributed_bench.py --faces F --labels L --config gpu --nproc 4 --threads 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_bench import add_table_arguments  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
SMOKE_SETTINGS = [
    "teacher.model.weights=none",
    "teacher.model.input_size=64",
    "teacher.batch_size=32",
    "teacher.epochs=2",
    "teacher.num_workers=0",
    "teacher.lr.range_test=false",
    "teacher.checkpoint_every=0",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_arguments(parser)
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads of the single process (split evenly between the data-parallel processes)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of the two modes")
    parser.add_argument("--work", default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="generated tables (512 faces), untrained 64 px network")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_run(command: list[str], out: Path) -> dict:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "train_s": metrics["result"]["train_seconds"], "history": metrics["history"]}


def largest_difference(a: list[dict], b: list[dict]) -> float:
    """The largest |a - b| over the epochs' train losses and validation metrics."""
    pairs = [(x[part], y[part]) for part in ("train", "val") for x, y in zip(a, b, strict=True)]
    return max(abs(float(p[k]) - float(q[k])) for p, q in pairs for k in p.keys() & q.keys())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="distributed-bench-"))
    overrides = list(args.overrides)
    if args.smoke:
        sys.path.insert(0, str(REPO / "tests"))
        from generated.tables import make_tiny_tables

        tables = make_tiny_tables(work / "ingest", per_dataset=256, image_size=64)
        args.faces, args.labels = tables["faces"], tables["labels"]
        overrides = SMOKE_SETTINGS + overrides
    if not (args.faces and args.labels):
        raise SystemExit("give --faces and --labels (an ingest output), or --smoke")
    common = [
        "--config",
        args.config,
        "--faces",
        args.faces,
        "--labels",
        args.labels,
        *(f"--set={item}" for item in [*overrides, "teacher.progress=false"]),
    ]
    bin_dir = Path(sys.executable).parent
    runs: dict[str, list[dict]] = {"single": [], "data_parallel": []}
    for repeat in range(args.repeats):
        out = work / f"single-{repeat}"
        runs["single"].append(
            timed_run(
                [
                    str(bin_dir / "d2mtl"),
                    "teacher",
                    *common,
                    f"--set=teacher.threads={args.threads}",
                    "--out",
                    str(out),
                ],
                out,
            )
        )
        out = work / f"ddp{args.nproc}-{repeat}"
        runs["data_parallel"].append(
            timed_run(
                [
                    str(bin_dir / "torchrun"),
                    f"--nproc-per-node={args.nproc}",
                    f"--master-port={free_port()}",
                    "-m",
                    "d2mtl.cli",
                    "teacher",
                    *common,
                    f"--set=teacher.threads={max(1, args.threads // args.nproc)}",
                    "--out",
                    str(out),
                ],
                out,
            )
        )
    best = {
        mode: {key: min(run[key] for run in found) for key in ("wall_s", "train_s")} for mode, found in runs.items()
    }
    print(
        json.dumps(
            {
                "nproc": args.nproc,
                "threads": args.threads,
                "load_average": [round(x, 1) for x in os.getloadavg()],
                "rounds": {
                    mode: [{k: v for k, v in run.items() if k != "history"} for run in found]
                    for mode, found in runs.items()
                },
                "best": best,
                "train_time_ratio": round(best["data_parallel"]["train_s"] / best["single"]["train_s"], 2),
                "largest_metric_difference": largest_difference(
                    runs["single"][0]["history"], runs["data_parallel"][0]["history"]
                ),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
