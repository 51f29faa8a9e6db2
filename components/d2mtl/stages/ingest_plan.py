"""The ingest plan: which inputs, in which order, in which split, and which part of them a shard ingests.

The row order and the hash splits are seeded hashes of the sample id (``unit_hash``), each in its own
namespace, so they are deterministic and independent of one another; they live together to keep it so.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from d2mtl.config.ingest import DatasetSpec, IngestConfig, SplitConfig
from d2mtl.sources import TRAINVAL, Entry, Source
from d2mtl.stages.ingest_report import IngestReport

OUTPUT_NEUTRAL = {"workers", "chunk_size", "scratch_dir", "shuffle_rows"}  # settings that never change the output


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
