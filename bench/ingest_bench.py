"""Ingest throughput against the detector alone, and peak memory against dataset size, on a profile's datasets.

    .venv/bin/python bench/ingest_bench.py --data-root ../shared/data --out /tmp/ingest-bench --images 2000

1. Ingest faces/s on N images spread evenly over the profile's datasets (each dataset's ``limit`` is N / datasets:
   the stage's deterministic choice of the lowest sample ids; listing, decode, detect, align, JPEG-encode,
   Parquet, report) vs detector-only faces/s on exactly those images, decoded beforehand, in the same number of
   worker processes, with the stage's detector settings (small images upscaled as in the stage). Repeats are
   interleaved, best of each. Goal: ratio >= 0.8.
2. Peak memory (RSS of the stage process and of its largest worker) ingesting N images vs all of the profile's
   images, each in a fresh process. Goal: flat.
Results go in BENCHMARKS.md (section "Ingest").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from collections import Counter, defaultdict

import numpy as np

from d2mtl.config import IngestConfig, load_experiment
from d2mtl.faces import FaceDetector, UnreadableImage, decode_rgb
from d2mtl.sources import Payload, Rejected
from d2mtl.stages import ingest
from d2mtl.stages.ingest import open_sources
from d2mtl.stages.ingest_plan import plan_dataset
from d2mtl.stages.ingest_report import IngestReport
from d2mtl.stages.ingest_workers import worker_count


def ingest_config(args: argparse.Namespace, images: int | None) -> IngestConfig:
    """The profile's ingest section with ``images`` spread evenly over its datasets (None: all of them)."""
    cfg = load_experiment(args.config, args.overrides, data_root=args.data_root).ingest
    count = len(cfg.datasets)
    datasets = [
        spec.model_copy(update={"limit": None if images is None else images // count + (i < images % count)})
        for i, spec in enumerate(cfg.datasets)
    ]
    return cfg.model_copy(update={"datasets": datasets, "workers": args.workers})


def chosen_payloads(cfg: IngestConfig) -> tuple[list[tuple[str, Payload]], float]:
    """(dataset, payload) of every readable image the stage's ``limit`` picks, and the seconds listing took."""
    started = time.perf_counter()
    chosen = []
    with contextlib.ExitStack() as stack:
        sources = open_sources(cfg, stack)
        planned = [plan_dataset(index, spec, source, IngestReport()) for index, (spec, source) in enumerate(sources)]
        listing_s = time.perf_counter() - started
        for (spec, source), dataset_plan in zip(sources, planned, strict=True):
            readable = [p.entry for p in dataset_plan if not p.entry.reject]
            chosen += [
                (spec.name, payload) for payload in source.payloads(readable) if not isinstance(payload, Rejected)
            ]
    return chosen, listing_s


def pixels(payload: Payload) -> np.ndarray | None:
    """RGB pixels as the stage's aligner decodes them (None: unreadable, which the stage rejects)."""
    if isinstance(payload, np.ndarray):
        return np.stack([payload] * 3, axis=-1)
    try:
        return decode_rgb(payload)
    except UnreadableImage:
        return None


def _detect_chunk(job: tuple[IngestConfig, list[tuple[str, Payload]]]) -> tuple[dict[str, tuple[int, float]], float]:
    """Per dataset: images and seconds spent detecting (only) on them, decoded first; and the CPU seconds of it."""
    import cv2

    cfg, chunk = job
    cv2.setNumThreads(1)
    detector = FaceDetector(cfg.detector, threads=1)
    images = [(dataset, rgb) for dataset, payload in chunk if (rgb := pixels(payload)) is not None]
    busy: dict[str, tuple[int, float]] = {}
    cpu_started = time.process_time()
    for dataset, rgb in images:
        started = time.perf_counter()
        detector.main_face(rgb)
        count, seconds = busy.get(dataset, (0, 0.0))
        busy[dataset] = (count + 1, seconds + time.perf_counter() - started)
    return busy, time.process_time() - cpu_started


def detector_only(cfg: IngestConfig, chosen: list[tuple[str, Payload]], workers: int) -> dict:
    """Faces/s of the detector alone in ``workers`` processes (the slowest worker's busy time), CPU ms per image,
    and ms per image by dataset."""
    chunks = [(cfg, chosen[i::workers]) for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        busy, cpu_s = zip(*pool.map(_detect_chunk, chunks), strict=True)
    images, seconds = Counter(), defaultdict(float)
    for worker in busy:
        for dataset, (count, spent) in worker.items():
            images[dataset] += count
            seconds[dataset] += spent
    slowest = max(sum(spent for _, spent in worker.values()) for worker in busy)
    return {
        "faces_per_s": sum(images.values()) / slowest,
        "cpu_ms_per_image": 1000 * sum(cpu_s) / sum(images.values()),
        "ms_per_image": {dataset: round(1000 * seconds[dataset] / images[dataset], 2) for dataset in images},
    }


def memory_probe(args: argparse.Namespace, images: int | None) -> dict:
    summary = ingest.run(ingest_config(args, images), args.out)
    cpu_s = sum(
        getattr(resource.getrusage(who), field)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for field in ("ru_utime", "ru_stime")
    )
    return {
        "images": summary["inputs"],
        "written": summary["written"],
        "elapsed_s": summary["elapsed_s"],
        "faces_per_s": summary["faces_per_s"],
        "images_per_s": round(summary["inputs"] / summary["elapsed_s"], 1),
        "cpu_ms_per_image": round(1000 * cpu_s / summary["inputs"], 2),
        "stage_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def probe_in_fresh_process(args: argparse.Namespace, images: int | None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--config",
        args.config,
        "--data-root",
        args.data_root,
        "--out",
        args.out,
        "--workers",
        str(args.workers),
        "--probe",
        str(images or 0),
    ]
    command += [f"--set={item}" for item in args.overrides]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu", help="profile (cpu, gpu) or experiment YAML: its ingest datasets")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set ingest.shuffle_rows=2048 (repeatable)",
    )
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--out", default="/tmp/ingest-bench", help="scratch output prefix")
    parser.add_argument("--images", type=int, default=2000, help="images of the comparison, over all datasets")
    parser.add_argument("--workers", type=int, default=0, help="0: the profile's setting (0 there: one per core)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the comparison")
    parser.add_argument("--skip-full", action="store_true", help="no memory probe on all images")
    parser.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)  # internal: one memory run
    args = parser.parse_args()
    args.workers = args.workers or worker_count(load_experiment(args.config, args.overrides).ingest)
    if args.probe is not None:
        print(json.dumps(memory_probe(args, args.probe or None)))
        return

    cfg = ingest_config(args, args.images)
    chosen, listing_s = chosen_payloads(cfg)
    runs, detector_runs = [], []
    for _ in range(args.repeats):  # interleaved, best of each: other load on the machine hits both alike
        runs.append(probe_in_fresh_process(args, args.images))
        detector_runs.append(detector_only(cfg, chosen, args.workers))
    small = max(runs, key=lambda run: run["images_per_s"])
    detector = max(detector_runs, key=lambda run: run["faces_per_s"])
    results = {
        "config": args.config,
        "datasets": [spec.name for spec in cfg.datasets],
        "workers": args.workers,
        "images": small["images"],
        "load_average_1min": round(os.getloadavg()[0], 2),
        "ingest_faces_per_s": small["faces_per_s"],
        "ingest_images_per_s": small["images_per_s"],
        "detector_only_faces_per_s": round(detector["faces_per_s"], 1),
        "ratio": round(small["images_per_s"] / detector["faces_per_s"], 2),
        "ingest_cpu_ms_per_image": small["cpu_ms_per_image"],
        "detector_cpu_ms_per_image": round(detector["cpu_ms_per_image"], 2),
        "cpu_ratio": round(detector["cpu_ms_per_image"] / small["cpu_ms_per_image"], 2),
        "detector_ms_per_image": detector["ms_per_image"],
        "listing_all_s": round(listing_s, 1),
        "ingest_runs_images_per_s": [run["images_per_s"] for run in runs],
        "detector_runs_faces_per_s": [round(run["faces_per_s"], 1) for run in detector_runs],
    }
    probes = [small] if args.skip_full else [small, probe_in_fresh_process(args, None)]
    results["memory_mb"] = {
        str(run["images"]): {"stage": round(run["stage_peak_mb"]), "worker": round(run["worker_peak_mb"])}
        for run in probes
    }
    if not args.skip_full:
        results["full"] = probes[1]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
