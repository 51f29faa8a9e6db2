"""Ingest throughput against the detector alone, and peak memory against dataset size.

    .venv/bin/python bench/ingest_bench.py --data-root ../shared/data --out /tmp/ingest-bench

1. Ingest faces/s on the first N UTKFace images (the stage's deterministic ``limit``; decode, detect,
   align, JPEG-encode, Parquet) vs detector-only faces/s on the same images (decoded beforehand,
   same number of worker processes). Goal: ratio >= 0.8.
2. Peak memory (RSS of the stage process and of its largest worker) ingesting N images vs all of
   UTKFace, each in a fresh process. Goal: flat.
Results go in BENCHMARKS.md (section "Ingest").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from d2mtl.config.ingest import IngestConfig, UTKFaceSpec
from d2mtl.faces import FaceDetector, decode_rgb
from d2mtl.stages import ingest
from d2mtl.stages.ingest import sample_id, worker_count


def ingest_config(data_root: str, limit: int | None, workers: int) -> IngestConfig:
    return IngestConfig(data_root=data_root, workers=workers, datasets=[UTKFaceSpec(limit=limit)])


def chosen_files(data_root: str, limit: int) -> list[Path]:
    """The same images the stage's ``limit`` picks: the lowest sample ids."""
    files = sorted(p.name for p in Path(data_root, "utkface").iterdir() if not p.name.startswith("."))
    return [Path(data_root, "utkface", name) for name in sorted(files, key=lambda n: sample_id("utkface", n))[:limit]]


def _detect_chunk(paths: list[Path]) -> float:
    """Seconds spent detecting (only) on these images, decoded first."""
    detector = FaceDetector(threads=1)
    images = [decode_rgb(path.read_bytes()) for path in paths]
    started = time.perf_counter()
    for image in images:
        detector.main_face(image)
    return time.perf_counter() - started


def detector_only(paths: list[Path], workers: int) -> float:
    """Faces/s of the detector alone in ``workers`` processes (busy time, split evenly)."""
    chunks = [paths[i::workers] for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        busy = pool.map(_detect_chunk, chunks)
    return len(paths) / max(busy)


def memory_probe(data_root: str, limit: int | None, workers: int, out: str) -> dict:
    summary = ingest.run(ingest_config(data_root, limit, workers), out)
    return {"images": summary["inputs"], "faces_per_s": summary["faces_per_s"],
            "stage_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def probe_in_fresh_process(args: argparse.Namespace, limit: int | None) -> dict:
    command = [sys.executable, __file__, "--data-root", args.data_root, "--out", args.out, "--workers",
               str(args.workers), "--probe", str(limit or 0)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--out", default="/tmp/ingest-bench", help="scratch output prefix")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the 2,000-image comparison")
    parser.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)  # internal: one memory run
    args = parser.parse_args()
    args.workers = args.workers or worker_count(IngestConfig())
    if args.probe is not None:
        print(json.dumps(memory_probe(args.data_root, args.probe or None, args.workers, args.out)))
        return

    files = chosen_files(args.data_root, args.images)
    runs, detector_fps = [], []
    for _ in range(args.repeats):  # interleaved, best of each: other load on the machine hits both alike
        runs.append(probe_in_fresh_process(args, args.images))
        detector_fps.append(detector_only(files, args.workers))
    small = max(runs, key=lambda run: run["faces_per_s"])
    full = probe_in_fresh_process(args, None)
    results = {
        "workers": args.workers, "images": args.images, "load_average_1min": os.getloadavg()[0],
        "ingest_faces_per_s": small["faces_per_s"], "detector_only_faces_per_s": round(max(detector_fps), 1),
        "ratio": round(small["faces_per_s"] / max(detector_fps), 2),
        "memory_mb": {str(run["images"]): {"stage": round(run["stage_peak_mb"]), "worker": round(run["worker_peak_mb"])}
                      for run in (small, full)},
        "full_faces_per_s": full["faces_per_s"],
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
