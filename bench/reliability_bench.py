"""Reliability figures too slow for the test suite (issue 9). Results go in RELIABILITY.md.

    nice -n 19 .venv/bin/python bench/reliability_bench.py kills --trials 3 --kills 2
    nice -n 19 .venv/bin/python bench/reliability_bench.py bomb
    nice -n 19 .venv/bin/python bench/reliability_bench.py unreachable
    nice -n 19 .venv/bin/python bench/reliability_bench.py real-ingest --data-root ../shared/data --limit 100

kills: per stage (teacher, student) and trial, SIGKILL ``d2mtl <stage>`` (tiny tables, weights none, 32 px,
deterministic, checkpoint every 2 steps) at --kills random steps in a row, rerunning after each, then let it
finish: counts the trials whose final weights equal an uninterrupted run's bit for bit.
bomb: time and peak memory of a fresh process refusing 30000 x 30000 PNG / JPEG headers (2.7 GB if decoded).
unreachable: seconds until the default store settings give up on an endpoint nobody listens on.
real-ingest: --limit real UTKFace + FER2013 images ingested twice with face detection: identical content hashes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def kills(args: argparse.Namespace) -> dict:
    import torch
    from conftest import kill_after_checkpoint, tiny_training_overrides
    from generated.tables import make_tiny_tables, write_pseudo_table
    from safetensors.torch import load_file

    from d2mtl import layout
    from d2mtl.config import load_experiment
    from d2mtl.stages import student, teacher

    results = {}
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        root = Path(tmp)
        tables = make_tiny_tables(root / "ingest")
        pseudo = str(root / "pseudo.parquet")
        write_pseudo_table(tables, pseudo)
        inputs = {
            "teacher": ["--faces", tables["faces"], "--labels", tables["labels"]],
            "student": ["--faces", tables["faces"], "--labels", tables["labels"], "--pseudo", pseudo],
        }
        for stage in ("teacher", "student"):
            cfg = getattr(load_experiment("cpu", tiny_training_overrides(stage)), stage)
            straight = root / stage / "straight"
            if stage == "teacher":
                teacher.run(cfg, tables["faces"], tables["labels"], str(straight))
            else:
                student.run(cfg, tables["faces"], tables["labels"], pseudo, str(straight))
            total = len(json.loads((straight / layout.TRAIN_METRICS).read_text())["lr"]["trace"])
            expected = load_file(straight / layout.WEIGHTS_FILE)
            trials = []
            for trial in range(args.trials):
                rng = np.random.default_rng(100 + trial)
                out = root / stage / f"trial{trial}"
                command = [sys.executable, "-m", "d2mtl.cli", stage, *inputs[stage], "--out", str(out)]
                for item in tiny_training_overrides(stage):
                    command += ["--set", item]
                killed_at, step = [], 0
                started = time.perf_counter()
                for _ in range(args.kills):
                    low, high = step + 1, min(step + total // 2, total - 2)  # leave steps to kill in
                    if low > high:
                        break
                    step = kill_after_checkpoint(
                        command, out / layout.CHECKPOINT_FILE, int(rng.integers(low, high + 1)), rng
                    )
                    killed_at.append(step)
                subprocess.run(command, cwd=REPO, check=True, capture_output=True)
                resumed = load_file(out / layout.WEIGHTS_FILE)
                exact = all(torch.equal(expected[k], resumed[k]) for k in expected)
                trials.append(
                    {
                        "killed_at_checkpoint_steps": killed_at,
                        "exact": exact,
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                )
                print(stage, trials[-1], flush=True)
            results[stage] = {
                "total_steps": total,
                "trials": trials,
                "exact": sum(t["exact"] for t in trials),
                "of": len(trials),
            }
    return results


BOMB_PROBE = """
import resource, sys, time
sys.path.insert(0, {tests!r})
from generated.images import jpeg_claiming, png_claiming
from d2mtl.faces import ImageTooLarge, decode_rgb
data = {{"png": png_claiming(30000, 30000), "jpeg": jpeg_claiming(30000, 30000)}}[sys.argv[1]]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    decode_rgb(data)
    outcome = "decoded"
except ImageTooLarge as err:
    outcome = f"refused: {{err}}"
print(
    round((time.perf_counter() - started) * 1e3, 2),
    (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024,
    len(data),
    outcome,
    sep="\\t",
)
"""


def bomb(args: argparse.Namespace) -> dict:
    results = {}
    for kind in ("png", "jpeg"):
        out = (
            subprocess.run(
                [sys.executable, "-c", BOMB_PROBE.format(tests=str(REPO / "tests")), kind],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .split("\t")
        )
        results[kind] = {
            "ms": float(out[0]),
            "peak_rss_growth_mb": int(out[1]),
            "file_bytes": int(out[2]),
            "outcome": out[3],
        }
        print(kind, results[kind], flush=True)
    return results


def unreachable(args: argparse.Namespace) -> dict:
    from conftest import free_port

    from d2mtl import store

    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret"
    )
    settings = store.StoreSettings()
    store.configure(settings)
    started = time.perf_counter()
    try:
        store.read_bytes("s3://bucket/x")
        message = "read succeeded?"
    except store.StoreError as err:
        message = str(err)
    result = {
        "retries": settings.retries,
        "backoff_s": settings.backoff_s,
        "seconds": round(time.perf_counter() - started, 2),
        "message": message,
    }
    print(result, flush=True)
    return result


def real_ingest(args: argparse.Namespace) -> dict:
    from d2mtl import contracts, layout, store
    from d2mtl.config.ingest import FER2013FolderSpec, IngestConfig, UTKFaceSpec
    from d2mtl.stages import ingest

    cfg = IngestConfig(
        data_root=args.data_root,
        workers=1,
        datasets=[UTKFaceSpec(limit=args.limit), FER2013FolderSpec(limit=args.limit)],
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        for run in ("one", "two"):
            out = str(Path(tmp, run))
            started = time.perf_counter()
            summary = ingest.run(cfg, out)
            manifest = contracts.read_manifest(layout.faces(out))
            runs.append(
                {
                    "seconds": round(time.perf_counter() - started, 1),
                    "written": summary["written"],
                    "shards": [s["sha256"] for s in manifest["shards"]],
                    "labels_sha256": hashlib.sha256(store.read_bytes(layout.labels(out))).hexdigest(),
                }
            )
    result = {
        "inputs": 2 * args.limit,
        "written": runs[0]["written"],
        "seconds": [r["seconds"] for r in runs],
        "identical": runs[0]["shards"] == runs[1]["shards"] and runs[0]["labels_sha256"] == runs[1]["labels_sha256"],
    }
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("kills")
    p.add_argument("--trials", type=int, default=3, help="runs per stage, each killed --kills times")
    p.add_argument("--kills", type=int, default=2, help="SIGKILLs per run (each followed by a rerun)")
    p.set_defaults(func=kills)
    sub.add_parser("bomb").set_defaults(func=bomb)
    sub.add_parser("unreachable").set_defaults(func=unreachable)
    p = sub.add_parser("real-ingest")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--limit", type=int, default=100, help="images per dataset")
    p.set_defaults(func=real_ingest)
    args = parser.parse_args()
    print(json.dumps(args.func(args), indent=1))


if __name__ == "__main__":
    main()
