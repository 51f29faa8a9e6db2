import os

import pyarrow as pa
import pytest

from d2mtl import contracts, store


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_env")
    return "s3://bucket/test-" + request.node.name.replace("[", "-").replace("]", "")


def test_bytes_round_trip_and_listing(root):
    store.write_bytes(store.join(root, "a/x.bin"), b"hello")
    store.write_text(store.join(root, "a/b/y.txt"), "world")
    assert store.read_bytes(store.join(root, "a/x.bin")) == b"hello"
    assert store.exists(store.join(root, "a/b/y.txt"))
    assert not store.exists(store.join(root, "a/missing"))
    assert sorted(u.rsplit("/", 1)[-1] for u in store.list_files(store.join(root, "a"))) == ["x.bin", "y.txt"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes(store.join(root, "nope.bin"))
    store.delete(store.join(root, "a"))
    assert store.list_files(store.join(root, "a")) == []


def test_minio_uris_are_listed_as_minio_uris(s3_env):
    root = "minio://bucket/test-minio-listing"
    store.write_text(store.join(root, "a/x.txt"), "hello")
    assert store.list_files(root) == [f"{root}/a/x.txt"]
    assert store.read_text(store.list_files(root)[0]) == "hello"
    store.delete(root)


def test_local_files_get_the_usual_mode(tmp_path):
    umask = os.umask(0o027)
    try:
        store.write_bytes(str(tmp_path / "a.bin"), b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary file left


def test_face_table_round_trip(root, tmp_path):
    from generated.tables import make_tiny_tables

    local = make_tiny_tables(tmp_path / "gen", per_dataset=10)
    writer = contracts.FaceTableWriter(store.join(root, "faces"), shard_rows=7)
    for batch in contracts.iter_face_batches(local["faces"]):
        for row in batch.to_pylist():
            writer.write(row)
    manifest = writer.close()
    assert manifest["rows"] == 20 and len(manifest["shards"]) == 3
    table = contracts.read_face_columns(store.join(root, "faces"), ["sample_id", "dataset"])
    assert table.num_rows == 20 and table.column("dataset").to_pylist().count("utk") == 10


def test_face_table_without_manifest_is_not_read(tmp_path):
    writer = contracts.FaceTableWriter(str(tmp_path / "faces"), shard_rows=1)
    writer.write(
        {
            "sample_id": "a",
            "dataset": "d",
            "domain": "d",
            "split": "train",
            "subject": None,
            "image": b"x",
            "source_uri": "u",
            "det_score": None,
            "box": None,
            "landmarks": None,
            "alignment": "trusted_crop",
        }
    )
    with pytest.raises(contracts.ContractError, match="did not finish"):
        contracts.face_shards(str(tmp_path / "faces"))


def test_label_table_nullable_and_versioned(tmp_path):
    uri = str(tmp_path / "labels.parquet")
    rows = [{"sample_id": "a", "age": 30.0}, {"sample_id": "b", "expression": 3}]
    contracts.write_table(pa.Table.from_pylist(rows, schema=contracts.LABEL_SCHEMA), uri, contracts.LABELS)
    table = contracts.read_table(uri, contracts.LABELS)
    assert table.column("age").to_pylist() == [30.0, None]
    assert table.column("expression").to_pylist() == [None, 3]


def test_unknown_schema_version_refused(tmp_path):
    import pyarrow.parquet as pq

    uri = tmp_path / "labels.parquet"
    table = pa.table({"sample_id": ["a"]}).replace_schema_metadata({contracts.SCHEMA_KEY: b"labels/99"})
    pq.write_table(table, uri)
    with pytest.raises(contracts.ContractError, match="version 99 is not supported"):
        contracts.read_table(str(uri), contracts.LABELS)
    pq.write_table(pa.table({"sample_id": ["a"]}), uri)
    with pytest.raises(contracts.ContractError, match="not a d2mtl labels table"):
        contracts.read_table(str(uri), contracts.LABELS)


def test_wrong_credentials_one_line_without_secret(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-123")
    store.configure(store.StoreSettings(retries=0))
    with pytest.raises(store.StoreError) as err:
        store.write_bytes("s3://bucket/x.bin", b"1")
    assert "not-the-secret-123" not in str(err.value) and "\n" not in str(err.value)


def test_unreachable_store_bounded_retries(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store.configure(store.StoreSettings(retries=2, backoff_s=0.01))
    try:
        with pytest.raises(store.StoreError, match="unreachable after 3 attempts"):
            store.read_bytes("s3://bucket/x")
    finally:
        store.configure(store.StoreSettings())
