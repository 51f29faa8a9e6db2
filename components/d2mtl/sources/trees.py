"""Where a dataset's files come from: a local folder, an ``s3://`` prefix, or a .zip / .tar(.gz) archive.

Every tree lists files as sorted POSIX paths relative to the dataset root and reads them by that
path, so adapters never see the difference. Archives whose members all sit under one top folder
(``UTKFace/...``) have that folder stripped, so an archive and its unpacked folder give the same
relative paths, hence the same sample ids.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from d2mtl import store
from d2mtl.errors import UserError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


class ArchiveError(UserError):
    """An archive that cannot be read safely."""


def _common_top(names: list[str]) -> str:
    """The single top folder all names share (``"UTKFace/"``), else ``""``."""
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) == 1 and all("/" in name for name in names):
        return tops.pop() + "/"
    return ""


class Tree:
    """Files of one dataset: ``files()`` relative paths, ``read(rel)`` bytes, ``uri(rel)`` for the report."""

    def __init__(self, base_uri: str):
        self.base_uri = base_uri

    def files(self) -> list[str]:
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def uri(self, rel: str) -> str:
        return store.join(self.base_uri, rel)

    def open(self, rel: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A streamed binary file object (large CSVs)."""
        raise NotImplementedError

    def find(self, name: str) -> str | None:
        """``name`` itself if present, else the one file whose path ends with ``/name``."""
        files = self.files()
        if name in files:
            return name
        matches = [f for f in files if f.endswith("/" + name)]
        return matches[0] if len(matches) == 1 else None


class FolderTree(Tree):
    """A local folder or an ``s3://`` prefix, through d2mtl.store."""

    def __init__(self, base_uri: str, member_prefix: str | None = None):
        super().__init__(base_uri)
        self.member_prefix = member_prefix  # "archive.tar.gz!top/" when the folder is an unpacked archive
        self._files: list[str] | None = None

    def files(self) -> list[str]:
        if self._files is None:
            if store.is_remote(self.base_uri):
                prefix = self.base_uri.rstrip("/") + "/"
                self._files = [uri[len(prefix) :] for uri in store.list_files(self.base_uri)]
            else:
                prefix = len(str(Path(self.base_uri))) + 1
                self._files = sorted(path[prefix:].replace(os.sep, "/") for path in store.list_files(self.base_uri))
        return self._files

    def read(self, rel: str) -> bytes:
        return store.read_bytes(store.join(self.base_uri, rel))

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[IO[bytes]]:
        with store.local_path(store.join(self.base_uri, rel)) as path, open(path, "rb") as handle:
            yield handle

    def uri(self, rel: str) -> str:
        return self.member_prefix + rel if self.member_prefix else store.join(self.base_uri, rel)


class ZipTree(Tree):
    """Members of a .zip read in place; absolute, ``..`` and escaping symlink members are refused."""

    def __init__(self, path: Path, shown_as: str):
        super().__init__(shown_as)
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise ArchiveError(f"cannot open archive {shown_as}: {err}") from None
        members = [info for info in self.zip.infolist() if not info.is_dir()]
        for info in members:
            _check_member(info.filename, shown_as)
        self.top = _common_top([info.filename for info in members])
        self.members = {
            info.filename[len(self.top) :]: info
            for info in members
            if not PurePosixPath(info.filename).name.startswith(".")
        }

    def files(self) -> list[str]:
        return sorted(self.members)

    def read(self, rel: str) -> bytes:
        info = self.members.get(rel)
        if info is None:
            raise FileNotFoundError(rel)
        if stat.S_ISLNK(info.external_attr >> 16):
            target = posixpath.normpath(posixpath.join(posixpath.dirname(rel), self.zip.read(info).decode()))
            _check_member(target, self.base_uri)
            return self.read(target)
        try:
            return self.zip.read(info)
        except (zipfile.BadZipFile, OSError, EOFError) as err:  # a damaged member: the caller reports the row
            raise OSError(f"damaged archive member: {err}") from None

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[IO[bytes]]:
        with self.zip.open(self.members[rel]) as handle:
            yield handle

    def uri(self, rel: str) -> str:
        return f"{self.base_uri}!{self.top}{rel}"


def _check_member(name: str, archive: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"archive {archive} has an unsafe member {name!r} (absolute path or '..'); refusing it")


def _extract_tar(path: Path, shown_as: str, into: Path) -> None:
    """Unpack with tarfile's ``data`` filter (refuses links escaping, special files); absolute and ``..``
    members are refused first, where the filter would quietly strip a leading slash."""
    try:
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                _check_member(member.name, shown_as)
            archive.extractall(into, filter="data")
    except tarfile.FilterError as err:
        raise ArchiveError(f"archive {shown_as} has an unsafe member: {err}; refusing it") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ArchiveError(f"cannot read archive {shown_as}: {err}") from None


def is_archive(uri: str) -> bool:
    return uri.lower().endswith(ARCHIVE_SUFFIXES)


@contextlib.contextmanager
def _archive_tree(uri: str, scratch_dir: str | None) -> Iterator[Tree]:
    with store.local_path(uri) as path:
        if uri.lower().endswith(".zip"):
            tree = ZipTree(path, uri)
            try:
                yield tree
            finally:
                tree.zip.close()
            return
        with tempfile.TemporaryDirectory(prefix="d2mtl-ingest-", dir=scratch_dir) as tmp:
            _extract_tar(path, uri, Path(tmp))
            entries = [p for p in Path(tmp).iterdir() if not p.name.startswith(".")]
            root = entries[0] if len(entries) == 1 and entries[0].is_dir() else Path(tmp)
            top = root.name + "/" if root != Path(tmp) else ""
            yield FolderTree(str(root), member_prefix=f"{uri}!{top}")


def _is_folder(uri: str) -> bool:
    if store.is_remote(uri):
        return bool(store.list_files(uri))
    return Path(uri).is_dir()


@contextlib.contextmanager
def open_tree(uri: str, scratch_dir: str | None = None) -> Iterator[Tree | None]:
    """The tree at ``uri`` (a folder, prefix or archive; else ``uri`` + an archive suffix), or None if absent."""
    if is_archive(uri) and store.exists(uri):
        with _archive_tree(uri, scratch_dir) as tree:
            yield tree
        return
    if _is_folder(uri):
        yield FolderTree(uri)
        return
    if store.exists(uri):
        raise UserError(f"{uri} is a file; a dataset path names a folder or a .zip / .tar / .tar.gz archive")
    for suffix in ARCHIVE_SUFFIXES:
        if store.exists(uri + suffix):
            with _archive_tree(uri + suffix, scratch_dir) as tree:
                yield tree
            return
    yield None
