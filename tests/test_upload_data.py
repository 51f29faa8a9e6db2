"""``d2mtl upload-data`` (d2mtl.upload) against a real S3 server on loopback (rclone serve s3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2mtl import store, upload
from d2mtl.cli import main
from d2mtl.errors import UserError

FILES = {
    "utkface/1_0_0_20170109150557335.jpg.chip.jpg": b"\xff\xd8 face",
    "fer2013/train/happy/Training_1.jpg": b"x",
    "fer2013/test/sad/PublicTest_2.jpg": b"yy",
    "README.md": b"# data",
}


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for name, content in {**FILES, ".DS_Store": b"junk", "utkface/.cache/x": b"junk"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def test_upload_copies_the_tree_then_only_what_is_missing(s3_env, data_root):
    dest = "s3://bucket/upload-tree/datasets"
    first = upload.upload_tree(data_root, dest, workers=3)
    assert (first.uploaded, first.skipped, first.bytes_uploaded) == (4, 0, sum(map(len, FILES.values())))
    assert store.list_files(dest) == sorted(f"{dest}/{name}" for name in FILES)
    assert all(store.read_bytes(f"{dest}/{name}") == content for name, content in FILES.items())

    store.delete(f"{dest}/fer2013/test/sad/PublicTest_2.jpg")  # as if the first run had been interrupted
    again = upload.upload_tree(data_root, dest)
    assert (again.uploaded, again.skipped) == (1, 3)
    assert store.read_bytes(f"{dest}/fer2013/test/sad/PublicTest_2.jpg") == b"yy"

    (data_root / "README.md").write_bytes(b"# data, edited")
    assert upload.upload_tree(data_root, dest).uploaded == 0  # present objects are not compared ...
    assert upload.upload_tree(data_root, dest, overwrite=True).uploaded == 4  # ... unless asked to
    assert store.read_bytes(f"{dest}/README.md") == b"# data, edited"


def test_upload_to_a_bucket_root_and_to_a_local_folder(s3_env, data_root, tmp_path):
    assert upload.upload_tree(data_root, "s3://rootbucket").uploaded == 4
    assert upload.upload_tree(data_root, "s3://rootbucket/").skipped == 4
    local = tmp_path / "copy"
    assert upload.upload_tree(data_root, str(local)).uploaded == 4
    assert upload.upload_tree(data_root, str(local)).skipped == 4
    assert (local / "fer2013/train/happy/Training_1.jpg").read_bytes() == b"x"


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not a local folder"):
        upload.upload_tree(tmp_path / "missing", str(tmp_path / "out"))
    with pytest.raises(UserError, match="not a local folder"):
        upload.upload_tree("s3://bucket/datasets", str(tmp_path / "out"))
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(UserError, match="no files"):
        upload.upload_tree(tmp_path / "empty", str(tmp_path / "out"))


def test_a_failed_upload_stops_the_rest(tmp_path, monkeypatch):
    import time

    for i in range(40):
        (tmp_path / "data" / f"{i:02d}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "data" / f"{i:02d}.jpg").write_bytes(b"x")
    sent = []

    def upload_file(local, uri):
        sent.append(uri)
        if len(sent) == 2:
            raise store.StoreError(f"write {uri}: access denied")
        time.sleep(0.01)

    monkeypatch.setattr(store, "upload_file", upload_file)
    with pytest.raises(store.StoreError, match="access denied"):
        upload.upload_tree(tmp_path / "data", str(tmp_path / "out"), workers=2)
    assert len(sent) < 10


def test_cli_uploads_the_data_root(s3_env, data_root, capsys):
    assert main(["upload-data", "--data-root", str(data_root), "--dest", "s3://bucket/cli/datasets"]) == 0
    assert "uploaded 4 files" in capsys.readouterr().out
    assert main(["upload-data", "--data-root", str(data_root / "missing"), "--dest", "s3://bucket/cli"]) == 2
    assert capsys.readouterr().err.strip().endswith("is not a local folder")
