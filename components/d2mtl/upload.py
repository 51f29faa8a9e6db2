"""``d2mtl upload-data``: copy a local dataset folder into object storage, for runs on a cluster.

The tree is copied as it is (``<source>/utkface/x.jpg`` -> ``<dest>/utkface/x.jpg``), so the destination is a data
root that ``d2mtl ingest --data-root <dest>`` reads like the local folder. Objects already under the destination
are skipped: every PUT is atomic (store.upload_file), so an object that exists is complete, and a rerun after an
interruption sends only what is missing. ``overwrite=True`` sends everything again.
"""

from __future__ import annotations

import logging
import os
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


def _local_names(root: Path) -> list[str]:
    """POSIX names (``utkface/x.jpg``) of every file below ``root``, sorted, leaving out hidden files and folders
    (.DS_Store, .cache, ...). os.walk rather than Path.rglob: 0.4 s instead of 2 s for UTKFace + FER2013 (48k files)."""
    names = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        prefix = Path(folder).relative_to(root).as_posix()
        names += [
            name if prefix == "." else f"{prefix}/{name}"
            for name in files
            if not name.startswith(".") and os.path.isfile(os.path.join(folder, name))
        ]
    return sorted(names)


def _present_names(dest: str) -> set[str]:
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
    names = _local_names(root)
    if not names:
        raise UserError(f"{source} holds no files to upload")
    present = set() if overwrite else _present_names(dest)
    todo = [name for name in names if name not in present]
    log.info(
        "%d files under %s: %d to upload to %s, %d already there",
        len(names),
        root,
        len(todo),
        dest,
        len(names) - len(todo),
    )
    with tqdm(total=len(todo), unit="file", desc="upload") as progress, ThreadPoolExecutor(workers) as pool:
        if todo:  # the first file alone: it creates the bucket, and a wrong endpoint or key fails once, here
            store.upload_file(root / todo[0], store.join(dest, todo[0]))
            progress.update()
        futures = [pool.submit(store.upload_file, root / name, store.join(dest, name)) for name in todo[1:]]
        try:
            for future in as_completed(futures):
                future.result()
                progress.update()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # one clear error, not thousands of further failed uploads
            raise
    return UploadSummary(
        dest=dest,
        uploaded=len(todo),
        skipped=len(names) - len(todo),
        bytes_uploaded=sum((root / name).stat().st_size for name in todo),
    )
