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

This module is the stage's flow; the plan (sample ids, row order, splits, shard parts) is in ``ingest_plan``,
the per-image work and its worker processes in ``ingest_workers``, the report in ``ingest_report``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

import pyarrow as pa
from tqdm import tqdm

from d2mtl import contracts, layout, store
from d2mtl.config.ingest import DatasetSpec, IngestConfig
from d2mtl.errors import UserError
from d2mtl.sources import SOURCES, Payload, Rejected, Source, open_tree
from d2mtl.stages.ingest_plan import Planned, assign_split, part_of, plan_digest, plan_inputs
from d2mtl.stages.ingest_report import IngestReport, markdown
from d2mtl.stages.ingest_workers import AlignedFace, ordered_parallel, worker_count, worker_pool

log = logging.getLogger(__name__)

LABEL_COLUMNS = tuple(contracts.LABEL_SCHEMA.names[1:])


class DatasetNotFound(UserError):
    """A configured dataset that is not under the data root."""


def dataset_uri(data_root: str, path: str) -> str:
    if store.is_remote(path) or os.path.isabs(path):
        return path
    return store.join(data_root, path)


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
        yield from zip(block, found, strict=True)


def counted(items: Iterable, bar: tqdm) -> Iterator:
    """``items``, each counted on ``bar`` as it is taken (tqdm's own iterator counts an item only when the next one
    is asked for, so a consumer that takes exactly the items it expects left the bar one short)."""
    for item in items:
        bar.update()
        yield item


# ---------------------------------------------------------------- the stage


def write_outputs(out: str, labels: pa.Table, summary: dict) -> None:
    """The label table and the reports (after the face table)."""
    contracts.write_table(labels, layout.labels(out), contracts.LABELS)
    store.write_text(store.join(out, layout.INGEST_REPORT_JSON), json.dumps(summary, indent=1))
    store.write_text(store.join(out, layout.INGEST_REPORT_MD), markdown(summary))


def result_of(summary: dict) -> dict:
    return {key: summary[key] for key in ("inputs", "written", "rejected", "elapsed_s", "faces_per_s")}


def run(cfg: IngestConfig, out: str, shard: tuple[int, int] = (0, 1)) -> dict:
    """Ingest part ``i`` of ``n`` of the plan (default: all of it) into ``out``: faces/, labels.parquet,
    report.json, report.md. A part is a complete ingest output of its share of the faces; ``merge`` combines
    the n parts into the output of one pass."""
    index, count = shard
    layout.check_shard(index, count)
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
        shard = report["shard"]
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
    names = [shard["path"] for shard in contracts.read_manifest(source)["shards"]] + [layout.FACES_MANIFEST]
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
