"""The ingest stage end to end on generated layouts (trust_crop) and a few real faces (detect)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import read_ingest_output, trusted_ingest_config
from generated import layouts

from d2mtl import cli, contracts, store
from d2mtl.config import ConfigError, load_experiment
from d2mtl.config.ingest import (
    AdienceSpec,
    CKPlusSpec,
    CsvManifestSpec,
    FairFaceSpec,
    FER2013CsvSpec,
    FER2013FolderSpec,
    ImageFolderSpec,
    IngestConfig,
    JAFFESpec,
    UTKFaceSpec,
)
from d2mtl.faces import decode_rgb
from d2mtl.sources import TRAINVAL, Entry
from d2mtl.stages import ingest, ingest_plan


def all_layouts(root) -> list:
    layouts.utkface(root)
    layouts.fer_folder(root, per_class=1)
    layouts.fer_csv(root / "fer_csv" / "fer2013.csv")
    layouts.ckplus(root)
    layouts.jaffe(root)
    layouts.adience(root)
    layouts.fairface(root)
    layouts.image_folder(root)
    layouts.manifest(root)
    return [
        UTKFaceSpec(),
        FER2013FolderSpec(),
        FER2013CsvSpec(name="fer_csv", path="fer_csv"),
        CKPlusSpec(),
        JAFFESpec(),
        AdienceSpec(),
        FairFaceSpec(),
        ImageFolderSpec(name="moods", path="moods"),
        CsvManifestSpec(name="manifest", path="manifest", split_column="split"),
    ]


@pytest.fixture(scope="module")
def every_layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    out = root.parent / "out"
    summary = ingest.run(trusted_ingest_config(root, all_layouts(root)), str(out))
    return summary, *read_ingest_output(str(out)), root


def test_report_adds_up_for_every_layout(every_layout):
    summary, faces, _labels, report, _ = every_layout
    assert summary["inputs"] == summary["written"] + summary["rejected"] == 7 + 14 + 3 + 12 + 5 + 5 + 4 + 3 + 3
    for name, ds in report["datasets"].items():
        assert ds["inputs"] == ds["written"] + ds["rejected"] == ds["listed"], name
        assert ds["rejected"] == sum(ds["rejected_by_reason"].values())
        assert ds["written"] == sum(ds["splits"].values()) == Counter(f["dataset"] for f in faces)[name]
    assert len(report["rejects"]) == summary["rejected"]
    assert report["datasets"]["utkface"]["rejected_by_reason"] == {"label_out_of_range": 1, "malformed_name": 1}
    assert report["datasets"]["utkface"]["notes"] == {"race missing in file name": 1}
    assert report["datasets"]["ckplus"]["rejected_by_reason"] == {"dropped_class": 4}
    assert report["datasets"]["jaffe"]["rejected_by_reason"] == {"malformed_name": 1}  # README.txt


def test_face_rows_follow_the_contract(every_layout):
    _, faces, labels, _, _ = every_layout
    assert [row["sample_id"] for row in labels] == [row["sample_id"] for row in faces]
    assert len({row["sample_id"] for row in faces}) == len(faces)
    for row in faces:
        assert row["split"] in contracts.SPLITS and row["alignment"] == "trusted_crop"
        assert decode_rgb(row["image"]).shape == (32, 32, 3)
    first = next(row for row in faces if row["source_uri"].endswith("25_0_2_20170116174525125.jpg.chip.jpg"))
    assert first["sample_id"] == ingest_plan.sample_id("utkface", "25_0_2_20170116174525125.jpg.chip.jpg")
    assert first["domain"] == "utkface"


def test_labels_land_in_their_columns(every_layout):
    _, faces, labels, _, root = every_layout
    by_uri = {face["source_uri"][len(str(root)) :]: label for face, label in zip(faces, labels, strict=True)}
    assert by_uri["/utkface/25_0_2_20170116174525125.jpg.chip.jpg"] == {
        "sample_id": ingest_plan.sample_id("utkface", "25_0_2_20170116174525125.jpg.chip.jpg"),
        "age": 25.0,
        "gender": 0,
        "race": 2,
        "expression": None,
        "age_low": None,
        "age_high": None,
    }
    adience_a = by_uri["/adience/aligned/u1/landmark_aligned_face.1.a.jpg"]
    assert (adience_a["age"], adience_a["age_low"], adience_a["age_high"], adience_a["gender"]) == (None, 25, 32, 1)
    assert by_uri["/fer_csv/fer2013.csv#row=2"]["expression"] == 6
    subjects = {}
    for face in faces:
        if face["dataset"] == "ckplus":
            subjects.setdefault(face["subject"], set()).add(face["split"])
    assert subjects and all(len(splits) == 1 for splits in subjects.values())


def test_bad_files_become_report_rows(tmp_path):
    folder = layouts.utkface(tmp_path)
    (folder / "20_0_0_20170116174525111.jpg.chip.jpg").write_bytes(b"")
    (folder / "21_0_0_20170116174525112.jpg.chip.jpg").write_bytes(layouts.image_bytes(3)[:-150])
    (folder / "22_0_0_20170116174525113.jpg.chip.jpg").write_text("<html>not found</html>")
    manifest = layouts.manifest(tmp_path)
    (manifest / "img" / "1.jpg").unlink()
    summary = ingest.run(
        trusted_ingest_config(tmp_path, [UTKFaceSpec(), CsvManifestSpec(name="m", path="manifest")]),
        str(tmp_path / "out"),
    )
    _, _, report = read_ingest_output(str(tmp_path / "out"))
    assert report["datasets"]["utkface"]["rejected_by_reason"]["unreadable_image"] == 3
    assert report["datasets"]["m"]["rejected_by_reason"] == {"label_out_of_range": 1, "missing_file": 1}
    assert summary["inputs"] == summary["written"] + summary["rejected"] == 10 + 3
    details = {row["detail"] for row in report["rejects"]}
    assert "empty file" in details and any("runcated" in detail for detail in details)


def test_detect_policies(tmp_path):
    layouts.utkface(tmp_path)
    spec = UTKFaceSpec(alignment="detect")
    cfg = IngestConfig(data_root=str(tmp_path), image_size=32, workers=1, datasets=[spec])
    summary = ingest.run(cfg, str(tmp_path / "detect"))
    assert summary["written"] == 0 and summary["rejected"] == 7  # noise has no face
    assert read_ingest_output(str(tmp_path / "detect"))[2]["datasets"]["utkface"]["rejected_by_reason"]["no_face"] == 5
    cfg.datasets[0] = spec.model_copy(update={"alignment": "detect_or_trust_crop"})
    assert ingest.run(cfg, str(tmp_path / "fallback"))["written"] == 5
    faces, _, _ = read_ingest_output(str(tmp_path / "fallback"))
    assert {face["alignment"] for face in faces} == {"trusted_crop"}
    assert all(face["det_score"] is None and face["landmarks"] is None for face in faces)


def test_same_inputs_give_identical_tables_with_any_worker_count(tmp_path):
    datasets = [UTKFaceSpec(), FER2013FolderSpec()]
    layouts.utkface(tmp_path)
    layouts.fer_folder(tmp_path, per_class=3)
    ingest.run(trusted_ingest_config(tmp_path, datasets), str(tmp_path / "one"))
    ingest.run(trusted_ingest_config(tmp_path, datasets, workers=2), str(tmp_path / "two"))
    one, two = read_ingest_output(str(tmp_path / "one")), read_ingest_output(str(tmp_path / "two"))
    assert one[0] == two[0] and one[1] == two[1]
    for name in contracts.face_shards(str(tmp_path / "one" / "faces")):
        other = name.replace(str(tmp_path / "one"), str(tmp_path / "two"))
        assert store.read_bytes(name) == store.read_bytes(other)


def test_limit_takes_the_lowest_sample_ids(tmp_path):
    layouts.fer_folder(tmp_path, per_class=2)
    out = str(tmp_path / "out")
    ingest.run(trusted_ingest_config(tmp_path, [FER2013FolderSpec(limit=5)]), out)
    faces, _, report = read_ingest_output(out)
    every = [
        f"{split}/{e}/{p}_{c}{i:04d}.jpg"
        for split, p in (("train", "Training"), ("test", "PublicTest"))
        for c, e in enumerate(layouts.FER_EMOTIONS)
        for i in range(2)
    ]
    assert sorted(f["sample_id"] for f in faces) == sorted(ingest_plan.sample_id("fer2013", p) for p in every)[:5]
    assert report["datasets"]["fer2013"]["limited_out"] == 23


def test_hash_split_fractions_and_trainval_carve_out():
    cfg = IngestConfig().split
    entry = Entry("x", "x")
    splits = Counter(ingest_plan.assign_split(entry, f"{i:016x}", cfg) for i in range(4000))
    assert abs(splits["val"] / 4000 - 0.1) < 0.02 and abs(splits["test"] / 4000 - 0.1) < 0.02
    trainval = Entry("x", "x", split=TRAINVAL)
    carved = Counter(ingest_plan.assign_split(trainval, f"{i:016x}", cfg) for i in range(4000))
    assert set(carved) == {"train", "val"} and abs(carved["val"] / 4000 - 0.1) < 0.02


def test_missing_dataset_says_what_to_download(tmp_path):
    layouts.utkface(tmp_path)
    cfg = IngestConfig(data_root=str(tmp_path), workers=1)
    with pytest.raises(ingest.DatasetNotFound, match=r"fer2013 not found at .*fer2013: download FER2013 from https"):
        ingest.run(cfg, str(tmp_path / "out"))


def test_cli_missing_data_root_is_one_line(tmp_path, capsys):
    code = cli.main(["ingest", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "utkface not found at" in err and "susanqq.github.io/UTKFace" in err and "--data-root" in err


def test_config_names_the_bad_dataset_field():
    with pytest.raises(ConfigError, match=r"ingest\.datasets\.0\.adience: .*val_folds and test_folds overlap"):
        load_experiment("cpu", ["ingest.datasets=[{format: adience, val_folds: [4], test_folds: [4]}]"])
    with pytest.raises(ConfigError, match=r"ingest\.datasets\.0"):
        load_experiment("cpu", ["ingest.datasets=[{format: celeba}]"])


def test_s3_round_trip(s3_env, tmp_path):
    folder = layouts.utkface(tmp_path / "local")
    for path in folder.iterdir():
        store.write_bytes(f"s3://bucket/data/utkface/{path.name}", path.read_bytes())
    layouts.fer_csv(tmp_path / "local" / "fer2013.csv")
    store.upload_file(tmp_path / "local" / "fer2013.csv", "s3://bucket/data/ferzip/fer2013.csv")
    cfg = trusted_ingest_config("s3://bucket/data", [UTKFaceSpec(), FER2013CsvSpec(path="ferzip")])
    summary = ingest.run(cfg, "s3://bucket/out/ingest")
    faces, labels, _report = read_ingest_output("s3://bucket/out/ingest")
    assert summary["written"] == len(faces) == len(labels) == 5 + 3
    assert faces[0]["source_uri"].startswith("s3://bucket/data/utkface/")
    assert store.exists("s3://bucket/out/ingest/report.md")
    local = trusted_ingest_config(tmp_path / "local", [UTKFaceSpec()])
    ingest.run(local, str(tmp_path / "local_out"))
    local_faces = read_ingest_output(str(tmp_path / "local_out"))[0]
    assert [f["image"] for f in local_faces] == [f["image"] for f in faces if f["dataset"] == "utkface"]


@pytest.mark.realdata
def test_real_faces_are_detected_and_aligned(shared_data, tmp_path):
    datasets = [UTKFaceSpec(limit=40), FER2013FolderSpec(limit=40)]
    cfg = IngestConfig(data_root=str(shared_data), workers=1, datasets=datasets)
    summary = ingest.run(cfg, str(tmp_path / "out"))
    faces, labels, report = read_ingest_output(str(tmp_path / "out"))
    assert summary["inputs"] == 80 == summary["written"] + summary["rejected"]
    assert report["datasets"]["utkface"]["alignment"].get("aligned", 0) >= 38
    assert report["datasets"]["fer2013"]["alignment"].get("aligned", 0) >= 34
    aligned = [f for f in faces if f["alignment"] == "aligned"]
    assert all(f["det_score"] >= 0.9 and len(f["landmarks"]) == 10 for f in aligned)
    assert decode_rgb(aligned[0]["image"]).shape == (112, 112, 3)
    utk = [label for face, label in zip(faces, labels, strict=True) if face["dataset"] == "utkface"]
    assert all(label["age"] is not None and label["expression"] is None for label in utk)
    assert np.mean([f["split"] == "train" for f in faces]) > 0.6
