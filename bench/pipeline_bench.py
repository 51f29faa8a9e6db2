"""Orchestration overhead of ``d2mtl run``: its wall time against the sum of its stages' own compute times.

A cold run (a fresh run root, so no cache hit) of the whole pipeline through kfp.local, timed from the outside
as a user waits for it; each task's ``stage_seconds`` (the time inside its stage function, logged by
d2mtl_pipeline.steps) is read back from the run folder. Goal: wall / sum of stage seconds <= 1.10.

    python bench/pipeline_bench.py --data-root ../shared/data                      # the CPU profile (~1 h here)
    python bench/pipeline_bench.py --data-root ../shared/data --append BENCHMARKS.md
    python bench/pipeline_bench.py --config my.yaml --data-root /data                # any experiment
    python bench/pipeline_bench.py --smoke         # generated tiny data (chain_bench --smoke's), 32 px: a few minutes

The run's log goes to <run root>/run.log. Also printed: the student's test metrics from the evaluate stage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from d2mtl import layout
from d2mtl_pipeline.local import executed_tasks

GOAL = 1.10


def run_dir_of(run_root: Path) -> Path:
    return run_root / json.loads((run_root / layout.LATEST_RUN).read_text())["run_id"]  # runs are named by id


def student_metrics(run_dir: Path) -> dict[str, float]:
    """The student's scalar test metrics, from the evaluate stage's metrics.json."""
    (path,) = run_dir.glob(f"evaluate/evaluation/{layout.EVAL_METRICS}")
    return {
        k.removeprefix("student/"): v
        for k, v in json.loads(path.read_text()).items()
        if k.startswith("student/") and "/test/" in k
    }


def report(run_dir: Path, wall: float, command: str) -> tuple[str, float]:
    """A markdown section (per-task stage seconds, the ratio, the student's metrics) and the ratio."""
    stages = {task: seconds for task, seconds in executed_tasks(run_dir).items() if seconds is not None}
    compute = sum(stages.values())
    ratio = wall / compute
    lines = [
        f"### Pipeline overhead ({datetime.now():%Y-%m-%d})",
        "",
        f"`{command}`",
        "",
        "| task | stage seconds |",
        "|---|---:|",
    ]
    lines += [f"| {task} | {seconds:.1f} |" for task, seconds in sorted(stages.items())]
    lines += [
        f"| **sum of stages** | **{compute:.1f}** |",
        f"| **`d2mtl run` wall time** | **{wall:.1f}** |",
        "",
        f"wall / sum of stages = **{ratio:.3f}** (goal <= {GOAL}; "
        f"{'met' if ratio <= GOAL else 'not met'}); {len(executed_tasks(run_dir))} tasks ran.",
        "",
    ]
    metrics = student_metrics(run_dir)
    if metrics:
        lines += ["Student, test split:", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in sorted(metrics.items())]
        lines.append("")
    return "\n".join(lines), ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu", help="experiment YAML or profile (default cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--run-root", default=None, help="a fresh folder for the run (default runs/bench-<time>)")
    parser.add_argument("--append", metavar="FILE", help="append the markdown section to FILE (e.g. BENCHMARKS.md)")
    parser.add_argument(
        "--smoke", action="store_true", help="generated tiny data and networks (chain_bench.py --smoke's)"
    )
    args = parser.parse_args(argv)

    run_root = Path(args.run_root or f"runs/bench-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    if run_root.exists() and any(run_root.iterdir()):
        parser.error(f"--run-root {run_root} is not empty: the bench needs a cold cache")
    run_root.mkdir(parents=True, exist_ok=True)
    overrides, data_root = args.overrides, args.data_root
    if args.smoke:
        from chain_bench import SMOKE_OVERRIDES  # bench/ is on sys.path when run as a script

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from generated.layouts import learnable_utkface_fer

        overrides = [*SMOKE_OVERRIDES, *overrides]
        data_root = str(learnable_utkface_fer(run_root.with_name(run_root.name + "-data")))
    command = [
        sys.executable,
        "-m",
        "d2mtl_pipeline.cli",
        "run",
        "--config",
        args.config,
        "--set",
        f"pipeline.run_root={run_root}",
        *[f"--set={item}" for item in overrides],
    ]
    if data_root:
        command += ["--data-root", data_root]
    shown = "python bench/pipeline_bench.py --smoke" if args.smoke else " ".join(["d2mtl", *command[3:]])
    print(f"running: {shown}\nlog: {run_root / 'run.log'}", flush=True)
    with open(run_root / "run.log", "w") as log:
        start = time.perf_counter()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        wall = time.perf_counter() - start
    if code:
        print(f"d2mtl run failed (exit {code}); see {run_root / 'run.log'}", file=sys.stderr)
        return code
    section, ratio = report(run_dir_of(run_root), wall, shown)
    print(section)
    if args.append:
        with open(args.append, "a") as out:
            out.write("\n" + section)
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
