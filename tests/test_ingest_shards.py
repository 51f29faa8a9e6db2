"""Sharded ingest: n parts merged give the tables of one pass; the face table is written in a seeded shuffled order."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from conftest import read_ingest_report, trusted_ingest_config
from generated import layouts

from d2mtl import cli, contracts, layout, store
from d2mtl.config.ingest import FER2013CsvSpec, FER2013FolderSpec, IngestConfig, UTKFaceSpec
from d2mtl.errors import UserError
from d2mtl.stages import ingest, ingest_plan

TIMING = ("elapsed_s", "faces_per_s", "config")  # config: the same but for shuffle_rows (checked apart)


def config(root: Path, **overrides) -> IngestConfig:
    """UTKFace (with rejected names), FER2013 folders and a FER2013 CSV (a streamed source), all trusted crops."""
    datasets = [UTKFaceSpec(), FER2013FolderSpec(), FER2013CsvSpec(name="fer_csv", path="fer_csv")]
    return trusted_ingest_config(root, datasets, **overrides)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    layouts.utkface(root)
    layouts.fer_folder(root, per_class=2)
    layouts.fer_csv(root / "fer_csv" / "fer2013.csv")
    return root


@pytest.fixture(scope="module")
def one_pass(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "ingest"
    ingest.run(config(data), str(out))
    return out


def ingest_parts(cfg: IngestConfig, folder: Path, count: int) -> list[str]:
    parts = [str(folder / f"part-{i}") for i in range(count)]
    for i, part in enumerate(parts):
        ingest.run(cfg, part, shard=(i, count))
    return parts


def files(out: Path) -> dict[str, bytes]:
    """Every file of the face table (shards + manifest) and the label table, by name."""
    names = [f"faces/{p.name}" for p in sorted((out / "faces").iterdir())] + [layout.LABELS_FILE]
    return {name: (out / name).read_bytes() for name in names}


def face_rows(out: Path) -> list[dict]:
    return [row for batch in contracts.iter_face_batches(str(out / "faces")) for row in batch.to_pylist()]


@pytest.mark.parametrize("count", [1, 3])
def test_sharded_and_merged_is_one_pass(data, one_pass, tmp_path, count):
    """Byte-identical face shards, manifest and label table; the same report but for the timing.

    The parts process the plan in blocks of 5 inputs (one pass: one block): blocks change neither order nor bytes."""
    parts = ingest_parts(config(data, shuffle_rows=5), tmp_path, count)
    part_rows = [contracts.read_manifest(layout.faces(p))["rows"] for p in parts]
    summary = ingest.merge(parts, str(tmp_path / "merged"))
    assert files(tmp_path / "merged") == files(one_pass)
    assert sum(part_rows) == summary["written"] == read_ingest_report(one_pass)["written"] > 0
    merged, single = read_ingest_report(tmp_path / "merged"), read_ingest_report(one_pass)
    assert [p["written"] for p in merged.pop("parts")] == part_rows
    merged.pop("merge_s")
    assert {k: v for k, v in merged.items() if k not in TIMING} == {k: v for k, v in single.items() if k not in TIMING}
    assert merged["config"] == {**single["config"], "shuffle_rows": 5}
    assert f"Merged from {count} part(s)" in (tmp_path / "merged" / layout.INGEST_REPORT_MD).read_text()


def test_parts_add_up_and_each_is_a_complete_output(data, tmp_path):
    parts = ingest_parts(config(data), tmp_path, 3)
    reports = [read_ingest_report(Path(p)) for p in parts]
    whole = sum(r["inputs"] for r in reports)
    assert whole == 7 + 28 + 3  # every listed input of the three datasets, in exactly one part
    for part, r in zip(parts, reports, strict=True):
        assert r["inputs"] == r["written"] + r["rejected"]
        assert abs(r["inputs"] - whole / 3) < 1  # consecutive, equal parts of the plan
        labels = contracts.read_table(layout.labels(part), contracts.LABELS)
        assert labels.column("sample_id").to_pylist() == [row["sample_id"] for row in face_rows(Path(part))]
    assert sorted(row["reason"] for r in reports for row in r["rejects"]) == ["label_out_of_range", "malformed_name"]


def test_rows_are_in_the_seeded_shuffled_order(data, one_pass, tmp_path):
    rows = face_rows(one_pass)
    ids = [row["sample_id"] for row in rows]
    assert ids == sorted(ids, key=lambda sid: (ingest_plan.row_key(sid, 0), sid))
    datasets = [row["dataset"] for row in rows]
    changes = sum(a != b for a, b in itertools.pairwise(datasets))
    assert changes > 2 * len(set(datasets)), "datasets interleave, not one block each"
    splits = [row["split"] for row in rows]
    assert splits != sorted(splits) and splits != sorted(splits, reverse=True)
    ingest.run(config(data, shuffle_seed=1), str(tmp_path / "seed1"))
    reseeded = face_rows(tmp_path / "seed1")
    assert [row["sample_id"] for row in reseeded] != ids
    by_id = lambda row: row["sample_id"]  # noqa: E731
    assert sorted(reseeded, key=by_id) == sorted(rows, key=by_id)


def test_more_shards_than_inputs(data, tmp_path):
    cfg = trusted_ingest_config(data, [FER2013CsvSpec(name="fer_csv", path="fer_csv")])
    parts = ingest_parts(cfg, tmp_path, 5)
    assert [read_ingest_report(Path(p))["inputs"] for p in parts] == [0, 1, 0, 1, 1]
    assert ingest.merge(parts, str(tmp_path / "merged"))["written"] == 3
    ingest.run(cfg, str(tmp_path / "one"))
    assert files(tmp_path / "merged") == files(tmp_path / "one")


def test_merge_refuses_an_incomplete_or_mixed_set(data, tmp_path):
    parts = ingest_parts(config(data), tmp_path / "a", 2)
    other = ingest_parts(config(data, shuffle_seed=3), tmp_path / "b", 2)
    with pytest.raises(UserError, match=r"missing shard\(s\) 1 of 2"):
        ingest.merge(parts[:1], str(tmp_path / "out"))
    with pytest.raises(UserError, match="shard 0 given twice"):
        ingest.merge([parts[0], parts[0], parts[1]], str(tmp_path / "out"))
    with pytest.raises(UserError, match="parts of different ingests"):
        ingest.merge([parts[0], other[1]], str(tmp_path / "out"))
    with pytest.raises(UserError, match="not an ingest output"):
        ingest.merge([str(tmp_path)], str(tmp_path / "out"))
    with pytest.raises(UserError, match="expected 0 <= i < n"):
        ingest.run(config(data), str(tmp_path / "out"), shard=(2, 2))
    assert not store.exists(str(tmp_path / "out" / "faces" / layout.FACES_MANIFEST))


def test_cli_shard_and_merge(data, one_pass, tmp_path, capsys):
    common = [
        "--data-root",
        str(data),
        "--set",
        "ingest.workers=1",
        "--set",
        "ingest.image_size=32",
        "--set",
        "ingest.shard_rows=8",
        "--set",
        "ingest.chunk_size=4",
        "--set",
        "ingest.datasets=[{format: utkface, alignment: trust_crop}, {format: fer2013_folder, alignment: "
        "trust_crop}, {format: fer2013_csv, name: fer_csv, path: fer_csv, alignment: trust_crop}]",
    ]
    for i in range(2):
        assert cli.main(["ingest", *common, "--out", str(tmp_path / f"p{i}"), "--shard", f"{i}/2"]) == 0
    assert (
        cli.main(["ingest", "--out", str(tmp_path / "merged"), "--merge", str(tmp_path / "p0"), str(tmp_path / "p1")])
        == 0
    )
    assert files(tmp_path / "merged") == files(one_pass)
    assert cli.main(["ingest", "--out", str(tmp_path / "x"), "--merge", str(tmp_path / "p1")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "d2mtl ingest: error: missing shard(s) 0 of 2; merge needs every shard"
    )
