"""``d2mtl upload-data`` throughput into an S3 server on loopback (rclone serve s3, as in the tests).

    .venv/bin/python bench/upload_bench.py --data-root ../shared/data

1. Workers: files/s uploading the same subset (--subset files of UTKFace) with 1, 4 and 8 parallel uploads.
   Goal: 8 workers >= 2x one worker (the default, 8, pays for itself).
2. The whole data root once, then again: the second run finds every object present and uploads nothing.
   Goal: the rerun costs at most 1.25x one listing of the destination (it makes no per-file request).
Loopback has no network latency, so a cluster port-forward is slower; the ratios are what this measures.
Results go in BENCHMARKS.md (section "Upload to object storage").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from d2mtl import store, upload


@contextlib.contextmanager
def loopback_s3(root: Path) -> Iterator[None]:
    """An rclone S3 server over ``root`` with the AWS_* variables pointing at it."""
    rclone = shutil.which("rclone") or str(Path(sys.executable).with_name("rclone"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [rclone, "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}", "--auth-key", "benchkey,benchsecret"],
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="benchkey",
        AWS_SECRET_ACCESS_KEY="benchsecret",
        AWS_REGION="us-east-1",
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield
    finally:
        server.terminate()
        server.wait(timeout=10)


def timed_upload(source: Path, dest: str, workers: int) -> dict:
    started = time.perf_counter()
    summary = upload.upload_tree(source, dest, workers=workers)
    seconds = time.perf_counter() - started
    return {
        "workers": workers,
        "uploaded": summary.uploaded,
        "skipped": summary.skipped,
        "mb": round(summary.bytes_uploaded / 1e6, 1),
        "seconds": round(seconds, 2),
        "files_per_s": round((summary.uploaded + summary.skipped) / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--subset", type=int, default=1000, help="UTKFace files in the worker comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="upload-bench-") as tmp:
        subset = Path(tmp, "subset", "utkface")
        subset.mkdir(parents=True)
        for path in sorted(Path(args.data_root, "utkface").iterdir())[: args.subset]:
            (subset / path.name).symlink_to(path.resolve())
        (Path(tmp) / "s3").mkdir()
        with loopback_s3(Path(tmp) / "s3"):
            store.configure(store.StoreSettings())
            scaling = [timed_upload(subset.parent, f"s3://bench/workers-{n}", n) for n in (1, 4, 8)]
            first = timed_upload(Path(args.data_root), "s3://bench/datasets", 8)
            again = timed_upload(Path(args.data_root), "s3://bench/datasets", 8)
            started = time.perf_counter()
            store.list_files("s3://bench/datasets")
            listing = time.perf_counter() - started
    result = {
        "scaling": scaling,
        "speedup_8_vs_1": round(scaling[2]["files_per_s"] / scaling[0]["files_per_s"], 2),
        "whole": first,
        "rerun": again,
        "listing_seconds": round(listing, 2),
        "rerun_vs_listing": round(again["seconds"] / listing, 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
