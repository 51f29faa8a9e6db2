"""Sharded ingest against one pass on real faces: wall time of each, and that the merged tables are identical.

    nice -n 19 .venv/bin/python bench/ingest_shards_bench.py --data-root ../shared/data --per-dataset 200 \\
        --shards 2 --out /work/runs/ingest-shard/bench

Runs one pass, then the n shards one after another, then the merge (on a cluster the shards run in parallel:
their wall time is the slowest shard's). Every shard lists the whole datasets and starts its own worker pool,
which is the overhead of sharding. Prints a Markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import filecmp
import time
from functools import partial
from pathlib import Path

from d2mtl import layout
from d2mtl.config.ingest import FER2013FolderSpec, IngestConfig, UTKFaceSpec
from d2mtl.stages import ingest


def timed(work) -> tuple[dict, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def same_tables(a: Path, b: Path) -> bool:
    faces = sorted(p.name for p in (a / layout.FACES_DIR).iterdir())
    if faces != sorted(p.name for p in (b / layout.FACES_DIR).iterdir()):
        return False
    names = [f"{layout.FACES_DIR}/{name}" for name in faces] + [layout.LABELS_FILE]
    return all(filecmp.cmp(a / name, b / name, shallow=False) for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding utkface/ and fer2013/")
    parser.add_argument("--per-dataset", type=int, default=200, help="images per dataset (the lowest sample ids)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="decode+detect processes of each run")
    parser.add_argument("--out", default="/tmp/ingest-shards-bench")
    args = parser.parse_args()

    cfg = IngestConfig(
        data_root=args.data_root,
        workers=args.workers,
        datasets=[UTKFaceSpec(limit=args.per_dataset), FER2013FolderSpec(limit=args.per_dataset)],
    )
    out = Path(args.out)
    one, one_s = timed(lambda: ingest.run(cfg, str(out / "one-pass")))
    parts, part_s = [], []
    for i in range(args.shards):
        parts.append(str(out / f"part-{i}"))
        part_s.append(timed(partial(ingest.run, cfg, parts[-1], shard=(i, args.shards)))[1])
    merged, merge_s = timed(lambda: ingest.merge(parts, str(out / "merged")))
    identical = same_tables(out / "one-pass", out / "merged")
    print(f"## Ingest: {args.shards} shards + merge vs one pass\n")
    command = (
        f"bench/ingest_shards_bench.py --data-root {args.data_root} --per-dataset {args.per_dataset} "
        f"--shards {args.shards} --workers {args.workers}"
    )
    print(
        f"`{command}`: {one['inputs']} real images ({one['written']} faces), {args.workers} worker(s) per run, "
        "the runs one after another on this machine.\n"
    )
    print("| run | wall s | faces/s |\n|---|---|---|")
    print(f"| one pass | {one_s:.1f} | {one['written'] / one_s:.1f} |")
    for i, seconds in enumerate(part_s):
        print(f"| shard {i}/{args.shards} | {seconds:.1f} | |")
    print(f"| merge | {merge_s:.1f} | |")
    sequence = sum(part_s) + merge_s
    print(f"| shards in sequence + merge | {sequence:.1f} | {merged['written'] / sequence:.1f} |")
    print(
        f"| slowest shard + merge (shards in parallel) | {max(part_s) + merge_s:.1f} | "
        f"{merged['written'] / (max(part_s) + merge_s):.1f} |"
    )
    print(f"\nMerged face shards and label table byte-identical to the one pass: {identical}.")


if __name__ == "__main__":
    main()
