"""The ingest stage: datasets in their native layouts -> aligned faces (sharded Parquet) + labels + a report.

For each configured dataset, its adapter (d2mtl.sources) lists entries with labels and official
splits; entries are then decoded, detected and aligned in worker processes (one onnxruntime
session with one thread each) in a bounded window, so memory does not grow with the dataset,
and written in listing order, so the output is deterministic. Every listed input ends up either
as a face row or as a rejected row with its reason: the report checks inputs == written + rejected.

Workers are started with ``spawn`` (no inherited threads or locks from the caller), so a script
that calls ``run`` with more than one worker needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from d2mtl import contracts, layout, store
from d2mtl.config.ingest import DatasetSpec, IngestConfig, SplitConfig
from d2mtl.errors import UserError
from d2mtl.faces import FaceDetector, UnreadableImage, align, center_crop_resize, decode_rgb, encode_jpeg
from d2mtl.sources import SOURCES, TRAINVAL, Entry, Payload, Rejected, Source, open_tree
from d2mtl.tasks import TASKS

log = logging.getLogger(__name__)

LABEL_COLUMNS = tuple(contracts.LABEL_SCHEMA.names[1:])
REJECT_EXAMPLES_MD = 5  # per dataset x reason in report.md; report.json lists every rejected row


class DatasetNotFound(UserError):
    """A configured dataset that is not under the data root."""


def sample_id(dataset: str, rel_path: str) -> str:
    return hashlib.sha1(f"{dataset}/{rel_path}".encode()).hexdigest()[:16]


def unit_hash(key: str, seed: int) -> float:
    """A deterministic number in [0, 1) per key: the basis of every hash split."""
    return int.from_bytes(hashlib.sha1(f"{seed}/{key}".encode()).digest()[:8], "big") / 2.0**64


def assign_split(entry: Entry, sid: str, split: SplitConfig) -> str:
    """The official split where the dataset has one; else a hash split by subject, else by sample id."""
    if entry.split == TRAINVAL:
        return "val" if unit_hash(sid, split.seed) < split.val_fraction else "train"
    if entry.split is not None:
        return entry.split
    u = unit_hash(entry.subject or sid, split.seed)
    if u < split.test_fraction:
        return "test"
    return "val" if u < split.test_fraction + split.val_fraction else "train"


def dataset_uri(data_root: str, path: str) -> str:
    if store.is_remote(path) or os.path.isabs(path):
        return path
    return store.join(data_root, path)


# ---------------------------------------------------------------- per-image work (runs in the workers)

@dataclass(frozen=True)
class AlignedFace:
    image: bytes
    alignment: str  # aligned | trusted_crop
    det_score: float | None = None
    box: list[float] | None = None
    landmarks: list[float] | None = None


class FaceAligner:
    """Decode, detect, align and encode one payload; one per worker process."""

    def __init__(self, cfg: IngestConfig):
        import cv2

        cv2.setNumThreads(1)
        self.size, self.quality = cfg.image_size, cfg.jpeg_quality
        self.detector = FaceDetector(min_score=cfg.detector.min_score, min_side=cfg.detector.min_side,
                                     max_side=cfg.detector.max_side, threads=1)

    def __call__(self, payload: Payload, policy: str) -> AlignedFace | Rejected:
        if isinstance(payload, Rejected):
            return payload
        try:
            rgb = decode_rgb(payload) if isinstance(payload, bytes) else np.stack([payload] * 3, axis=-1)
        except UnreadableImage as err:
            return Rejected("unreadable_image", str(err))
        reason = f"no face with score >= {self.detector.min_score}"
        if policy != "trust_crop":
            face = self.detector.main_face(rgb)
            if face is not None:
                try:
                    aligned = align(rgb, face.landmarks, self.size)
                    return AlignedFace(encode_jpeg(aligned, self.quality), "aligned", face.score,
                                       face.box.tolist(), face.landmarks.reshape(-1).tolist())
                except ValueError as err:
                    reason = str(err)
            if policy == "detect":
                return Rejected("no_face", reason)
        return AlignedFace(encode_jpeg(center_crop_resize(rgb, self.size), self.quality), "trusted_crop")


_aligner: FaceAligner | None = None  # this worker process's aligner (multiprocessing initializer)


def _init_worker(cfg_json: str) -> None:
    global _aligner
    _aligner = FaceAligner(IngestConfig.model_validate_json(cfg_json))


def _work(job: tuple[int, Entry, Payload, str]) -> tuple[int, Entry, AlignedFace | Rejected]:
    index, entry, payload, policy = job
    return index, entry, _aligner(payload, policy)


@contextlib.contextmanager
def worker_pool(cfg: IngestConfig, workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """``workers`` processes, each with its aligner (None: work in this process). Started before the
    datasets are listed, so their start-up overlaps the listing."""
    if workers == 1:
        _init_worker(cfg.model_dump_json())
        yield None
        return
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (cfg.model_dump_json(),))
    try:
        yield pool
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def ordered_parallel(jobs: Iterable, pool: multiprocessing.pool.Pool | None, in_flight: int,
                     chunk_size: int) -> Iterator:
    """``_work`` over ``jobs`` in order, with at most ``in_flight`` jobs read ahead.

    Pool.imap alone would read the whole input ahead (all image bytes in memory); a semaphore,
    released as results are consumed, bounds the read-ahead.
    """
    if pool is None:
        yield from map(_work, jobs)
        return
    window = threading.Semaphore(in_flight)
    stop = threading.Event()

    def gated() -> Iterator:
        for job in jobs:
            while not window.acquire(timeout=0.5):
                if stop.is_set():
                    return
            yield job

    try:
        for result in pool.imap(_work, gated(), chunksize=chunk_size):
            window.release()
            yield result
    finally:
        stop.set()


# ---------------------------------------------------------------- the report

def age_bin(age: float) -> str:
    decade = min(int(age) // 10 * 10, 100)
    return "100+" if decade == 100 else f"{decade}-{decade + 9}"


def label_classes(labels: dict) -> Iterator[tuple[str, str]]:
    """(task, class name) pairs of one sample's labels, for the counts."""
    for task, value in labels.items():
        if task in ("age_low", "age_high"):
            continue
        spec = TASKS[task]
        yield task, (age_bin(value) if spec.kind == "regression" else spec.classes[int(value)])
    if "age_low" in labels:
        yield "age_group", f"{labels['age_low']:g}-{labels['age_high']:g}"


class IngestReport:
    """Counts per dataset x split x task x class, alignment, notes, and every rejected row."""

    def __init__(self) -> None:
        self.listed: Counter[str] = Counter()
        self.limited_out: Counter[str] = Counter()
        self.written: Counter[str] = Counter()
        self.alignment: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.notes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.rejected: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.reject_rows: list[dict] = []
        self.classes: defaultdict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)  # (ds, split, task)
        self.splits: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def reject(self, dataset: str, sid: str, entry: Entry, reason: str, detail: str) -> None:
        self.rejected[dataset][reason] += 1
        self.reject_rows.append({"dataset": dataset, "sample_id": sid, "source_uri": entry.source_uri,
                                 "reason": reason, "detail": detail})

    def face(self, dataset: str, split: str, entry: Entry, alignment: str) -> None:
        self.written[dataset] += 1
        self.splits[dataset][split] += 1
        self.alignment[dataset][alignment] += 1
        for note in entry.notes:
            self.notes[dataset][note] += 1
        for task, name in label_classes(entry.labels):
            self.classes[dataset, split, task][name] += 1

    def inputs(self, dataset: str) -> int:
        return self.listed[dataset] - self.limited_out[dataset]

    def check(self) -> None:
        for dataset in self.listed:
            rejected = sum(self.rejected[dataset].values())
            if self.inputs(dataset) != self.written[dataset] + rejected:
                raise AssertionError(f"{dataset}: {self.inputs(dataset)} inputs != {self.written[dataset]} written "
                                     f"+ {rejected} rejected")

    def to_dict(self, cfg: IngestConfig, elapsed_s: float) -> dict:
        datasets = {}
        for dataset in self.listed:
            counts: dict = defaultdict(dict)
            for (ds, split, task), classes in sorted(self.classes.items()):
                if ds == dataset:
                    counts[split][task] = dict(sorted(classes.items()))
            datasets[dataset] = {
                "listed": self.listed[dataset], "limited_out": self.limited_out[dataset],
                "inputs": self.inputs(dataset), "written": self.written[dataset],
                "rejected": sum(self.rejected[dataset].values()),
                "rejected_by_reason": dict(sorted(self.rejected[dataset].items())),
                "splits": dict(sorted(self.splits[dataset].items())),
                "alignment": dict(sorted(self.alignment[dataset].items())),
                "notes": dict(sorted(self.notes[dataset].items())),
                "counts": dict(counts),
            }
        written = sum(self.written.values())
        return {
            "inputs": sum(self.inputs(d) for d in self.listed), "written": written,
            "rejected": len(self.reject_rows), "elapsed_s": round(elapsed_s, 1),
            "faces_per_s": round(written / elapsed_s, 1) if elapsed_s else None,
            "datasets": datasets, "rejects": self.reject_rows,
            "config": json.loads(cfg.model_dump_json()),
        }


def report_markdown(report: dict) -> str:
    lines = ["# Ingest report", "",
             f"{report['inputs']} inputs = {report['written']} faces written + {report['rejected']} rejected, "
             f"in {report['elapsed_s']} s ({report['faces_per_s']} faces/s).", "",
             "| dataset | listed | limited out | inputs | written | rejected | aligned | trusted crop |",
             "|---|---|---|---|---|---|---|---|"]
    for name, ds in report["datasets"].items():
        lines.append(f"| {name} | {ds['listed']} | {ds['limited_out']} | {ds['inputs']} | {ds['written']} | "
                     f"{ds['rejected']} | {ds['alignment'].get('aligned', 0)} | "
                     f"{ds['alignment'].get('trusted_crop', 0)} |")
    for name, ds in report["datasets"].items():
        lines += ["", f"## {name}", "", "Splits: " + ", ".join(f"{k} {v}" for k, v in ds["splits"].items())]
        if ds["notes"]:
            lines.append("Kept with a missing label: " + ", ".join(f"{k} ({v})" for k, v in ds["notes"].items()))
        if ds["rejected_by_reason"]:
            lines += ["", "| rejected: reason | rows | examples |", "|---|---|---|"]
            for reason, count in ds["rejected_by_reason"].items():
                examples = [r["source_uri"] for r in report["rejects"]
                            if r["dataset"] == name and r["reason"] == reason][:REJECT_EXAMPLES_MD]
                lines.append(f"| {reason} | {count} | {'<br>'.join(examples)} |")
        splits = list(ds["counts"])
        rows = sorted({(task, cls) for split in splits for task, classes in ds["counts"][split].items()
                       for cls in classes})
        if rows:
            lines += ["", "| task | class | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
            for task, cls in rows:
                cells = [str(ds["counts"][split].get(task, {}).get(cls, 0)) for split in splits]
                lines.append(f"| {task} | {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the stage

@dataclass
class DatasetPlan:
    spec: DatasetSpec
    source: Source
    entries: list[Entry]  # kept by the listing and the limit, in listing order


def limit_entries(entries: list[Entry], ids: list[str], limit: int | None) -> list[int]:
    """Indices of the ``limit`` entries with the lowest sample ids (a deterministic, label-blind sample)."""
    if limit is None or limit >= len(entries):
        return list(range(len(entries)))
    return sorted(sorted(range(len(entries)), key=ids.__getitem__)[:limit])


def plan_dataset(spec: DatasetSpec, source: Source, report: IngestReport) -> DatasetPlan:
    listed = list(source.entries())
    ids = [sample_id(spec.name, entry.path) for entry in listed]
    chosen = limit_entries(listed, ids, spec.limit)
    report.listed[spec.name] += len(listed)
    report.limited_out[spec.name] += len(listed) - len(chosen)
    kept = []
    for i in chosen:
        if listed[i].reject:
            report.reject(spec.name, ids[i], listed[i], listed[i].reject, listed[i].detail)
        else:
            kept.append(listed[i])
    return DatasetPlan(spec, source, kept)


def open_sources(cfg: IngestConfig, stack: contextlib.ExitStack) -> list[tuple[DatasetSpec, Source]]:
    """Every configured dataset's adapter; one error naming each missing dataset and how to get it."""
    found, missing = [], []
    for spec in cfg.datasets:
        uri = dataset_uri(cfg.data_root, spec.path)
        tree = stack.enter_context(open_tree(uri, cfg.scratch_dir))
        source_cls = SOURCES[spec.format]
        if tree is None:
            missing.append(f"{spec.name} not found at {uri}: {source_cls.download}")
        else:
            found.append((spec, source_cls(spec, tree)))
    if missing:
        raise DatasetNotFound("; ".join(missing) + " (or pass --data-root)")
    return found


def jobs_of(plans: list[DatasetPlan]) -> Iterator[tuple[int, Entry, Payload, str]]:
    for index, plan in enumerate(plans):
        for entry, payload in zip(plan.entries, plan.source.payloads(plan.entries), strict=True):
            yield index, entry, payload, plan.spec.alignment


def worker_count(cfg: IngestConfig) -> int:
    return cfg.workers or len(os.sched_getaffinity(0))


def run(cfg: IngestConfig, out: str) -> dict:
    """Ingest every dataset of ``cfg`` into ``out``: faces/, labels.parquet, report.json, report.md."""
    started = time.perf_counter()
    report = IngestReport()
    workers = worker_count(cfg)
    with contextlib.ExitStack() as stack:
        sources = open_sources(cfg, stack)
        pool = stack.enter_context(worker_pool(cfg, workers))
        plans = [plan_dataset(spec, source, report) for spec, source in sources]
        total = sum(len(plan.entries) for plan in plans)
        log.info("ingest: %d images from %s with %d worker(s)", total, ", ".join(p.spec.name for p in plans), workers)
        store.delete(layout.faces(out))
        writer = contracts.FaceTableWriter(layout.faces(out), cfg.shard_rows,
                                           metadata={"image_size": str(cfg.image_size), "template": "tight_5pt_v1"})
        labels: dict[str, list] = {name: [] for name in contracts.LABEL_SCHEMA.names}
        in_flight = workers * cfg.chunk_size * 4
        results = tqdm(ordered_parallel(jobs_of(plans), pool, in_flight, cfg.chunk_size), total=total, unit="face",
                       desc="ingest", mininterval=1 if sys.stderr.isatty() else 30)
        for index, entry, result in results:
            plan = plans[index]
            sid = sample_id(plan.spec.name, entry.path)
            if isinstance(result, Rejected):
                report.reject(plan.spec.name, sid, entry, result.reason, result.detail)
                continue
            split = assign_split(entry, sid, cfg.split)
            writer.write({"sample_id": sid, "dataset": plan.spec.name, "domain": plan.spec.domain_name,
                          "split": split, "subject": entry.subject, "image": result.image,
                          "source_uri": entry.source_uri, "det_score": result.det_score, "box": result.box,
                          "landmarks": result.landmarks, "alignment": result.alignment})
            labels["sample_id"].append(sid)
            for column in LABEL_COLUMNS:
                labels[column].append(entry.labels.get(column))
            report.face(plan.spec.name, split, entry, result.alignment)
        writer.close()
    report.check()
    contracts.write_table(pa.table(labels, schema=contracts.LABEL_SCHEMA), layout.labels(out), contracts.LABELS)
    summary = report.to_dict(cfg, time.perf_counter() - started)
    store.write_text(store.join(out, layout.INGEST_REPORT_JSON), json.dumps(summary, indent=1))
    store.write_text(store.join(out, layout.INGEST_REPORT_MD), report_markdown(summary))
    log.info("ingest: %d faces written, %d rejected, %.1f s -> %s", summary["written"], summary["rejected"],
             summary["elapsed_s"], out)
    return {key: summary[key] for key in ("inputs", "written", "rejected", "elapsed_s", "faces_per_s")}
