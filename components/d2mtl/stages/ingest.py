"""The ingest stage: datasets in their native layouts -> aligned faces (sharded Parquet) + labels + a report.

For each configured dataset, its adapter (d2mtl.sources) lists entries with labels and official
splits. The chosen inputs of all datasets form one *plan* in a shuffled order (a seeded hash of
the sample id, ``shuffle_seed``), so every shard of the face table holds a random mix of datasets,
splits and classes. The plan is processed in blocks of ``shuffle_rows`` inputs: each block's images
are read in listing order, decoded, detected and aligned in worker processes (one onnxruntime
session with one thread each) in a bounded read-ahead window, then written in plan order, so memory
does not grow with the dataset and the output is deterministic. Every listed input ends up either
as a face row or as a rejected row with its reason: the report checks inputs == written + rejected.

Sharding: ``run(..., shard=(i, n))`` ingests the i-th of n consecutive parts of the plan into a
complete ingest output of its own; ``merge`` concatenates the parts in order into the same face
table (same rows in the same order, same shard files), label table and counts as one pass.

Workers are started with ``spawn`` (no inherited threads or locks from the caller), so a script
that calls ``run`` with more than one worker needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
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
OUTPUT_NEUTRAL = {"workers", "chunk_size", "scratch_dir", "shuffle_rows"}  # settings that never change the output
REJECT_EXAMPLES_MD = 5  # per dataset x reason in report.md; report.json lists every rejected row


class DatasetNotFound(UserError):
    """A configured dataset that is not under the data root."""


def sample_id(dataset: str, rel_path: str) -> str:
    return hashlib.sha1(f"{dataset}/{rel_path}".encode()).hexdigest()[:16]


def unit_hash(key: str, seed: int) -> float:
    """A deterministic number in [0, 1) per key: the basis of every hash split."""
    return int.from_bytes(hashlib.sha1(f"{seed}/{key}".encode()).digest()[:8], "big") / 2.0**64


def row_key(sid: str, seed: int) -> float:
    """A face's place in the shuffled row order; its own hash namespace keeps it independent of the splits."""
    return unit_hash(f"row-order/{sid}", seed)


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
        self.detector = FaceDetector(
            min_score=cfg.detector.min_score, min_side=cfg.detector.min_side, max_side=cfg.detector.max_side, threads=1
        )

    def __call__(self, payload: Payload, policy: str) -> AlignedFace | Rejected:
        if isinstance(payload, Rejected):
            return payload
        try:
            rgb = decode_rgb(payload) if isinstance(payload, bytes) else np.stack([payload] * 3, axis=-1)
        except UnreadableImage as err:
            return Rejected(err.reason, str(err))
        reason = f"no face with score >= {self.detector.min_score}"
        if policy != "trust_crop":
            face = self.detector.main_face(rgb)
            if face is not None:
                try:
                    aligned = align(rgb, face.landmarks, self.size)
                    return AlignedFace(
                        encode_jpeg(aligned, self.quality),
                        "aligned",
                        face.score,
                        face.box.tolist(),
                        face.landmarks.reshape(-1).tolist(),
                    )
                except ValueError as err:
                    reason = str(err)
            if policy == "detect":
                return Rejected("no_face", reason)
        return AlignedFace(encode_jpeg(center_crop_resize(rgb, self.size), self.quality), "trusted_crop")


_aligner: FaceAligner | None = None  # this worker process's aligner (multiprocessing initializer)


def _init_worker(cfg_json: str) -> None:
    global _aligner
    _aligner = FaceAligner(IngestConfig.model_validate_json(cfg_json))


def _work(job: tuple[int, Payload, str]) -> tuple[int, AlignedFace | Rejected]:
    slot, payload, policy = job
    return slot, _aligner(payload, policy)


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


def ordered_parallel(
    jobs: Iterable, pool: multiprocessing.pool.Pool | None, in_flight: int, chunk_size: int
) -> Iterator:
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


def class_order(name: str) -> tuple[int, str]:
    """Sort key of a report class: age bins by their first year (``100+`` last), other classes by name."""
    first_year = name.split("-")[0].rstrip("+")
    return (int(first_year), "") if first_year.isdigit() else (-1, name)


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
        self.listed: Counter[str] = Counter()  # of the whole plan, in every part
        self.limited_out: Counter[str] = Counter()  # of the whole plan, in every part
        self.inputs: Counter[str] = Counter()  # of this part of the plan
        self.written: Counter[str] = Counter()
        self.alignment: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.notes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.rejected: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.reject_rows: list[dict] = []
        self.classes: defaultdict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)  # (ds, split, task)
        self.splits: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def reject(self, dataset: str, sid: str, entry: Entry, reason: str, detail: str) -> None:
        self.rejected[dataset][reason] += 1
        self.reject_rows.append(
            {"dataset": dataset, "sample_id": sid, "source_uri": entry.source_uri, "reason": reason, "detail": detail}
        )

    def face(self, dataset: str, split: str, entry: Entry, alignment: str) -> None:
        self.written[dataset] += 1
        self.splits[dataset][split] += 1
        self.alignment[dataset][alignment] += 1
        for note in entry.notes:
            self.notes[dataset][note] += 1
        for task, name in label_classes(entry.labels):
            self.classes[dataset, split, task][name] += 1

    def absorb(self, part: dict) -> None:
        """Add the counts of a part's report.json; the listing counts are the whole plan's in every part."""
        for dataset, ds in part["datasets"].items():
            self.listed[dataset], self.limited_out[dataset] = ds["listed"], ds["limited_out"]
            self.inputs[dataset] += ds["inputs"]
            self.written[dataset] += ds["written"]
            self.rejected[dataset].update(ds["rejected_by_reason"])
            self.splits[dataset].update(ds["splits"])
            self.alignment[dataset].update(ds["alignment"])
            self.notes[dataset].update(ds["notes"])
            for split, tasks in ds["counts"].items():
                for task, classes in tasks.items():
                    self.classes[dataset, split, task].update(classes)
        self.reject_rows += part["rejects"]

    def check(self) -> None:
        for dataset in self.listed:
            rejected = sum(self.rejected[dataset].values())
            if self.inputs[dataset] != self.written[dataset] + rejected:
                raise AssertionError(
                    f"{dataset}: {self.inputs[dataset]} inputs != {self.written[dataset]} written + {rejected} rejected"
                )

    def to_dict(self, cfg: IngestConfig, elapsed_s: float, shard: dict) -> dict:
        """The report.json document; ``shard``: which part of which plan (index, count, plan digest)."""
        datasets = {}
        use = {spec.name: spec.use for spec in cfg.datasets}
        for dataset in self.listed:
            counts: dict = defaultdict(dict)
            for (ds, split, task), classes in sorted(self.classes.items()):
                if ds == dataset:
                    counts[split][task] = dict(sorted(classes.items(), key=lambda item: class_order(item[0])))
            datasets[dataset] = {
                "use": use.get(dataset, "train"),
                "listed": self.listed[dataset],
                "limited_out": self.limited_out[dataset],
                "inputs": self.inputs[dataset],
                "written": self.written[dataset],
                "rejected": sum(self.rejected[dataset].values()),
                "rejected_by_reason": dict(sorted(self.rejected[dataset].items())),
                "splits": dict(sorted(self.splits[dataset].items())),
                "alignment": dict(sorted(self.alignment[dataset].items())),
                "notes": dict(sorted(self.notes[dataset].items())),
                "counts": dict(counts),
            }
        written = sum(self.written.values())
        return {
            "inputs": sum(self.inputs.values()),
            "written": written,
            "rejected": len(self.reject_rows),
            "elapsed_s": round(elapsed_s, 1),
            "faces_per_s": round(written / elapsed_s, 1) if elapsed_s else None,
            "datasets": datasets,
            "rejects": sorted(self.reject_rows, key=lambda r: (r["dataset"], r["sample_id"])),
            "config": json.loads(cfg.model_dump_json()),
            "shard": shard,
        }


def report_markdown(report: dict) -> str:
    lines = [
        "# Ingest report",
        "",
        f"{report['inputs']} inputs = {report['written']} faces written + {report['rejected']} rejected, "
        f"in {report['elapsed_s']} s ({report['faces_per_s']} faces/s).",
        "",
    ]
    if "parts" in report:
        lines += [
            f"Merged from {len(report['parts'])} part(s) (time: the parts' sum + {report['merge_s']} s of merge; "
            "per part: " + ", ".join(f"{p['elapsed_s']} s" for p in report["parts"]) + ").",
            "",
        ]
    lines += [
        "| dataset | listed | limited out | inputs | written | rejected | aligned | trusted crop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, ds in report["datasets"].items():
        lines.append(
            f"| {name} | {ds['listed']} | {ds['limited_out']} | {ds['inputs']} | {ds['written']} | "
            f"{ds['rejected']} | {ds['alignment'].get('aligned', 0)} | "
            f"{ds['alignment'].get('trusted_crop', 0)} |"
        )
    for name, ds in report["datasets"].items():
        lines += ["", f"## {name}", ""]
        if ds["use"] == "evaluate":
            lines.append("Evaluation only: its labels are never trained on; pseudo-labelling treats it as unlabelled.")
        lines.append("Splits: " + ", ".join(f"{k} {v}" for k, v in ds["splits"].items()))
        if ds["notes"]:
            lines.append("Kept with a missing label: " + ", ".join(f"{k} ({v})" for k, v in ds["notes"].items()))
        if ds["rejected_by_reason"]:
            lines += ["", "| rejected: reason | rows | examples |", "|---|---|---|"]
            for reason, count in ds["rejected_by_reason"].items():
                examples = [
                    r["source_uri"] for r in report["rejects"] if r["dataset"] == name and r["reason"] == reason
                ][:REJECT_EXAMPLES_MD]
                lines.append(f"| {reason} | {count} | {'<br>'.join(examples)} |")
        splits = list(ds["counts"])
        rows = sorted(
            {(task, cls) for split in splits for task, classes in ds["counts"][split].items() for cls in classes},
            key=lambda row: (row[0], class_order(row[1])),
        )
        if rows:
            lines += ["", "| task | class | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
            for task, cls in rows:
                cells = [str(ds["counts"][split].get(task, {}).get(cls, 0)) for split in splits]
                lines.append(f"| {task} | {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Planned:
    """One chosen input: its dataset (index into the opened sources), listing position, entry and sample id."""

    dataset: int
    position: int
    entry: Entry
    sample_id: str


def limit_entries(entries: list[Entry], ids: list[str], limit: int | None) -> list[int]:
    """Indices of the ``limit`` entries with the lowest sample ids (a deterministic, label-blind sample)."""
    if limit is None or limit >= len(entries):
        return list(range(len(entries)))
    return sorted(sorted(range(len(entries)), key=ids.__getitem__)[:limit])


def plan_dataset(index: int, spec: DatasetSpec, source: Source, report: IngestReport) -> list[Planned]:
    """The dataset's chosen entries in listing order; its listing counts go into ``report``."""
    listed = list(source.entries())
    ids = [sample_id(spec.name, entry.path) for entry in listed]
    chosen = limit_entries(listed, ids, spec.limit)
    report.listed[spec.name] += len(listed)
    report.limited_out[spec.name] += len(listed) - len(chosen)
    planned, seen = [], set()
    for i in chosen:
        entry = listed[i]
        if not entry.reject and ids[i] in seen:  # a manifest listing one image twice: keep the first row's labels
            entry = dataclasses.replace(entry, reject="duplicate_sample_id", detail=f"{entry.path} listed again")
        elif not entry.reject:
            seen.add(ids[i])
        planned.append(Planned(index, i, entry, ids[i]))
    return planned


def plan_inputs(cfg: IngestConfig, sources: list[tuple[DatasetSpec, Source]], report: IngestReport) -> list[Planned]:
    """Every chosen input of every dataset, in the shuffled row order (the order of the face table); a sample id
    listed twice keeps its listing order (a stable sort)."""
    planned = [p for index, (spec, source) in enumerate(sources) for p in plan_dataset(index, spec, source, report)]
    return sorted(planned, key=lambda p: (row_key(p.sample_id, cfg.shuffle_seed), p.sample_id))


def plan_digest(cfg: IngestConfig, planned: list[Planned]) -> str:
    """Identifies the plan (settings that shape the output + every planned sample id): parts merge only with
    parts of the same plan."""
    digest = hashlib.sha1(cfg.model_dump_json(exclude=OUTPUT_NEUTRAL).encode())
    for p in planned:
        digest.update(p.sample_id.encode())
    return digest.hexdigest()


def part_of(planned: list[Planned], shard: tuple[int, int]) -> list[Planned]:
    """The i-th of n consecutive, equal parts of the plan: concatenated in order, the parts are the plan."""
    index, count = shard
    return planned[index * len(planned) // count : (index + 1) * len(planned) // count]


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


def jobs_of(
    blocks: list[list[Planned]], sources: list[tuple[DatasetSpec, Source]]
) -> Iterator[tuple[int, Payload, str]]:
    """Every block's inputs as (place in the block, payload, alignment policy). Within a block, images are read
    dataset by dataset in listing order (an adapter may stream them, e.g. the rows of a CSV); an entry rejected
    at listing becomes its ``Rejected`` payload."""
    for block in blocks:
        slots = sorted(range(len(block)), key=lambda slot: (block[slot].dataset, block[slot].position))
        for dataset, group in itertools.groupby(slots, key=lambda slot: block[slot].dataset):
            spec, source = sources[dataset]
            group = list(group)
            readable = [slot for slot in group if not block[slot].entry.reject]
            for slot in group:
                if block[slot].entry.reject:
                    yield slot, Rejected(block[slot].entry.reject, block[slot].entry.detail), spec.alignment
            payloads = source.payloads([block[slot].entry for slot in readable])
            for slot, payload in zip(readable, payloads, strict=True):
                yield slot, payload, spec.alignment


def in_plan_order(
    blocks: list[list[Planned]], results: Iterator[tuple[int, AlignedFace | Rejected]]
) -> Iterator[tuple[Planned, object]]:
    """(input, result) pairs in plan order, block by block, from the results in job order. Pairs, not a list per
    block: a consumer holding a block's list while the next block's results arrive would hold two blocks."""
    for block in blocks:
        found: list = [None] * len(block)
        for _ in block:
            slot, result = next(results)
            found[slot] = result
        yield from zip(block, found)


def counted(items: Iterable, bar: tqdm) -> Iterator:
    """``items``, each counted on ``bar`` as it is taken (tqdm's own iterator counts an item only when the next one
    is asked for, so a consumer that takes exactly the items it expects left the bar one short)."""
    for item in items:
        bar.update()
        yield item


def worker_count(cfg: IngestConfig) -> int:
    return cfg.workers or len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- the stage


def write_outputs(out: str, labels: pa.Table, summary: dict) -> None:
    """The label table and the reports (after the face table)."""
    contracts.write_table(labels, layout.labels(out), contracts.LABELS)
    store.write_text(store.join(out, layout.INGEST_REPORT_JSON), json.dumps(summary, indent=1))
    store.write_text(store.join(out, layout.INGEST_REPORT_MD), report_markdown(summary))


def result_of(summary: dict) -> dict:
    return {key: summary[key] for key in ("inputs", "written", "rejected", "elapsed_s", "faces_per_s")}


def run(cfg: IngestConfig, out: str, shard: tuple[int, int] = (0, 1)) -> dict:
    """Ingest part ``i`` of ``n`` of the plan (default: all of it) into ``out``: faces/, labels.parquet,
    report.json, report.md. A part is a complete ingest output of its share of the faces; ``merge`` combines
    the n parts into the output of one pass."""
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise UserError(f"shard {index}/{count}: expected 0 <= i < n")
    started = time.perf_counter()
    report = IngestReport()
    workers = worker_count(cfg)
    with contextlib.ExitStack() as stack:
        sources = open_sources(cfg, stack)
        pool = stack.enter_context(worker_pool(cfg, workers))
        planned = plan_inputs(cfg, sources, report)
        mine = part_of(planned, shard)
        for p in mine:
            report.inputs[sources[p.dataset][0].name] += 1
        blocks = [mine[i : i + cfg.shuffle_rows] for i in range(0, len(mine), cfg.shuffle_rows)]
        log.info(
            "ingest: %d of %d images (shard %d/%d) from %s with %d worker(s)",
            len(mine),
            len(planned),
            index,
            count,
            ", ".join(spec.name for spec, _ in sources),
            workers,
        )
        store.delete(layout.faces(out))
        writer = contracts.FaceTableWriter(
            layout.faces(out),
            cfg.shard_rows,
            metadata={
                contracts.IMAGE_SIZE: str(cfg.image_size),
                contracts.TEMPLATE: contracts.FACE_TEMPLATE_NAME,
                contracts.EVALUATE_ONLY: json.dumps(cfg.evaluate_only),
            },
        )
        labels: dict[str, list] = {name: [] for name in contracts.LABEL_SCHEMA.names}
        in_flight = workers * cfg.chunk_size * 4
        bar = tqdm(total=len(mine), unit="face", desc="ingest", mininterval=1 if sys.stderr.isatty() else 30)
        results = counted(ordered_parallel(jobs_of(blocks, sources), pool, in_flight, cfg.chunk_size), bar)
        for p, result in in_plan_order(blocks, results):
            spec, entry, sid = sources[p.dataset][0], p.entry, p.sample_id
            if isinstance(result, Rejected):
                report.reject(spec.name, sid, entry, result.reason, result.detail)
                continue
            split = assign_split(entry, sid, cfg.split)
            writer.write(
                {
                    "sample_id": sid,
                    "dataset": spec.name,
                    "domain": spec.domain_name,
                    "split": split,
                    "subject": entry.subject,
                    "image": result.image,
                    "source_uri": entry.source_uri,
                    "det_score": result.det_score,
                    "box": result.box,
                    "landmarks": result.landmarks,
                    "alignment": result.alignment,
                }
            )
            labels["sample_id"].append(sid)
            for column in LABEL_COLUMNS:
                labels[column].append(entry.labels.get(column))
            report.face(spec.name, split, entry, result.alignment)
        bar.close()
        writer.close()
    report.check()
    summary = report.to_dict(
        cfg, time.perf_counter() - started, {"index": index, "count": count, "plan": plan_digest(cfg, planned)}
    )
    write_outputs(out, pa.table(labels, schema=contracts.LABEL_SCHEMA), summary)
    log.info(
        "ingest: %d faces written, %d rejected, %.1f s -> %s",
        summary["written"],
        summary["rejected"],
        summary["elapsed_s"],
        out,
    )
    return result_of(summary)


# ---------------------------------------------------------------- merging the parts of a sharded run


def read_parts(parts: list[str]) -> list[tuple[str, dict]]:
    """(output prefix, report.json) of every part, in shard order; refuses an incomplete or mixed set."""
    if not parts:
        raise UserError("merge needs the ingest parts to merge")
    found: dict[int, tuple[str, dict]] = {}
    for uri in parts:
        try:
            report = json.loads(store.read_text(store.join(uri, layout.INGEST_REPORT_JSON)))
        except FileNotFoundError:
            raise UserError(
                f"{uri}: no {layout.INGEST_REPORT_JSON}; not an ingest output "
                "(run d2mtl ingest --shard i/n --out there first)"
            ) from None
        shard = report.get("shard")
        if shard is None:
            raise UserError(f"{uri}: an ingest output without shard information (an older d2mtl); ingest it again")
        if found:
            other_uri, other = next(iter(found.values()))
            if (shard["plan"], shard["count"]) != (other["shard"]["plan"], other["shard"]["count"]):
                raise UserError(
                    f"{uri} and {other_uri} are parts of different ingests (other inputs, settings or "
                    "shard count); merge the parts of one sharded run"
                )
        if shard["index"] in found:
            raise UserError(f"shard {shard['index']} given twice: {found[shard['index']][0]} and {uri}")
        rows = contracts.read_manifest(layout.faces(uri))["rows"]
        if rows != report["written"]:
            raise contracts.ContractError(f"{uri}: its face table has {rows} rows, its report {report['written']}")
        found[shard["index"]] = (uri, report)
    count = next(iter(found.values()))[1]["shard"]["count"]
    missing = sorted(set(range(count)) - set(found))
    if missing:
        raise UserError(f"missing shard(s) {', '.join(map(str, missing))} of {count}; merge needs every shard")
    return [found[i] for i in range(count)]


def copy_face_table(source: str, destination: str) -> None:
    """A face table's files as they are, the manifest last."""
    names = [shard["path"] for shard in contracts.read_manifest(source)["shards"]] + [contracts.MANIFEST]
    for name in names:
        store.write_bytes(store.join(destination, name), store.read_bytes(store.join(source, name)))


def merge(parts: list[str], out: str) -> dict:
    """Combine the outputs of ``run(cfg, part, shard=(i, n))``, i = 0..n-1, into ``out``: the face rows of the
    parts in shard order, rewritten into shards of the parts' ``shard_rows`` (so the files are those one pass
    writes), the label tables concatenated, the reports added up."""
    started = time.perf_counter()
    found = read_parts(parts)
    first = found[0][1]
    cfg = IngestConfig.model_validate(first["config"])
    store.delete(layout.faces(out))
    if len(found) == 1:
        copy_face_table(layout.faces(found[0][0]), layout.faces(out))
    else:
        metadata = contracts.read_manifest(layout.faces(found[0][0]))["metadata"]
        writer = contracts.FaceTableWriter(layout.faces(out), cfg.shard_rows, metadata=metadata)
        for uri, _ in found:
            for batch in contracts.iter_face_batches(layout.faces(uri)):
                for row in batch.to_pylist():
                    writer.write(row)
        writer.close()
    labels = pa.concat_tables([contracts.read_table(layout.labels(uri), contracts.LABELS) for uri, _ in found])
    report = IngestReport()
    for _, part in found:
        report.absorb(part)
    report.check()
    incomplete = [
        name for name in report.listed if report.inputs[name] != report.listed[name] - report.limited_out[name]
    ]
    if incomplete or labels.num_rows != sum(report.written.values()):
        raise contracts.ContractError(f"the parts do not add up to their plan ({', '.join(incomplete) or 'labels'})")
    merge_s = time.perf_counter() - started
    summary = report.to_dict(
        cfg, sum(part["elapsed_s"] for _, part in found) + merge_s, {**first["shard"], "index": 0, "count": 1}
    )
    summary["parts"] = [{"shard": part["shard"]["index"], **result_of(part)} for _, part in found]
    summary["merge_s"] = round(merge_s, 1)
    write_outputs(out, labels, summary)
    log.info("ingest: merged %d parts, %d faces, in %.1f s -> %s", len(found), summary["written"], merge_s, out)
    return {**result_of(summary), "parts": len(found)}
