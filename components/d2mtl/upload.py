"""``d2mtl upload-data``: copy a local dataset folder into object storage, for runs on a cluster.

The tree is copied as it is (``<source>/utkface/x.jpg`` -> ``<dest>/utkface/x.jpg``), so the destination is a data
root that ``d2mtl ingest --data-root <dest>`` reads like the local folder. Objects already under the destination
are skipped: every PUT is atomic (store.upload_file), so an object that exists is complete, and a rerun after an
interruption sends only what is missing. ``overwrite=True`` sends everything again.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from d2mtl import store
from d2mtl.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadSummary:
    dest: str
    uploaded: int  # files sent by this call
    skipped: int  # files already present at the destination
    bytes_uploaded: int


def _local_files(root: Path) -> list[Path]:
    """Every file below ``root``, sorted, leaving out hidden files and folders (.DS_Store, .cache, ...)."""
    return sorted(path for path in root.rglob("*")
                  if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts))


def _relative_names(dest: str) -> set[str]:
    """Names (``utkface/x.jpg``) of the files already below ``dest``."""
    if not store.is_remote(dest):
        return {Path(uri).relative_to(dest).as_posix() for uri in store.list_files(dest)}
    _, prefix = store.split_s3(dest)
    skip = len(prefix.rstrip("/")) + 1 if prefix.strip("/") else 0
    return {store.split_s3(uri)[1][skip:] for uri in store.list_files(dest)}


def upload_tree(source: str | Path, dest: str, workers: int = 8, overwrite: bool = False) -> UploadSummary:
    """Copy every file below the local folder ``source`` to ``dest`` (an ``s3://bucket/prefix`` or a local path)."""
    root = Path(source)
    if store.is_remote(str(source)) or not root.is_dir():
        raise UserError(f"the data root {source} is not a local folder")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    files = _local_files(root)
    if not files:
        raise UserError(f"{source} holds no files to upload")
    present = set() if overwrite else _relative_names(dest)
    todo = [(path, name) for path in files if (name := path.relative_to(root).as_posix()) not in present]
    log.info("%d files under %s: %d to upload to %s, %d already there", len(files), root, len(todo), dest,
             len(files) - len(todo))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(store.upload_file, path, store.join(dest, name)) for path, name in todo]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), unit="file", desc="upload"):
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # one clear error, not thousands of further failed uploads
            raise
    return UploadSummary(dest=dest, uploaded=len(todo), skipped=len(files) - len(todo),
                         bytes_uploaded=sum(path.stat().st_size for path, _ in todo))
