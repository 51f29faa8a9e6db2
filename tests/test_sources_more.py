"""The RAF-DB, All-Age-Faces and APPA-REAL adapters on generated copies of each official layout, every bad
input as a report row, and a listing of the real copies in ../shared/data (no detection)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED_DATA, read_ingest_output, trusted_ingest_config
from generated import layouts

from d2mtl.config.ingest import AAFSpec, APPARealSpec, CsvManifestSpec, IngestConfig, RAFDBSpec
from d2mtl.errors import UserError
from d2mtl.sources import SOURCES, TRAINVAL, open_tree
from d2mtl.stages import ingest
from d2mtl.tasks import TASKS

EXPRESSION = TASKS["expression"].code_of
APPA_MANIFEST = CsvManifestSpec(
    name="appa", path="appa", split_column="split", split_map={"val": "test", "train": "trainval"}
)


def listing(spec, uri) -> dict:
    with open_tree(str(uri)) as tree:
        assert tree is not None, uri
        return {entry.path: entry for entry in SOURCES[spec.format](spec, tree).entries()}


def kept(entries: dict) -> dict:
    return {path: entry for path, entry in entries.items() if entry.reject is None}


def shared_dataset(folder: str) -> Path:
    if not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA / folder} (see ../shared/data/README.md)")
    return SHARED_DATA / folder


# ---------------------------------------------------------------- RAF-DB

ALIGNED = "basic/Image/aligned/"


def test_rafdb_codes_map_onto_fer2013_classes_and_official_splits(tmp_path):
    entries = listing(RAFDBSpec(), layouts.rafdb(tmp_path))
    good = kept(entries)
    assert [good[f"{ALIGNED}train_{i:05d}_aligned.jpg"].labels["expression"] for i in range(1, 8)] == [
        EXPRESSION(name) for name in ("surprise", "fear", "disgust", "happy", "sad", "angry", "neutral")
    ]
    assert {e.split for p, e in good.items() if "/train_" in p} == {TRAINVAL}
    assert {e.split for p, e in good.items() if "/test_" in p} == {"test"}
    assert len(good) == 9


def test_rafdb_bad_lines_are_report_rows(tmp_path):
    entries = listing(RAFDBSpec(), layouts.rafdb(tmp_path))
    rejects = {path: (e.reject, e.detail) for path, e in entries.items() if e.reject}
    assert rejects[f"{ALIGNED}train_00099_aligned.jpg"][0] == "missing_file"
    assert rejects[f"{ALIGNED}train_00008_aligned.jpg"][0] == "label_out_of_range"
    assert rejects[f"{ALIGNED}train_00009_aligned.jpg"][0] == "malformed_label"
    assert rejects[f"{ALIGNED}val_00001_aligned.jpg"][0] == "unknown_split"
    assert rejects["basic/EmoLabel/list_patition_label.txt#line=13"] == (
        "malformed_line",
        "'train_00010.jpg': expected '<name>.jpg <code 1-7>'",
    )
    assert len(rejects) == 5


def test_rafdb_train_part_alone_is_hash_split(tmp_path):
    good = kept(listing(RAFDBSpec(), layouts.rafdb(tmp_path, test_part=False)))
    assert len(good) == 7 and {e.split for e in good.values()} == {None}


def test_rafdb_path_may_name_basic_itself(tmp_path):
    good = kept(listing(RAFDBSpec(), layouts.rafdb(tmp_path) / "basic"))
    assert "Image/aligned/train_00001_aligned.jpg" in good and len(good) == 9


def test_rafdb_without_label_file_says_what_to_download(tmp_path):
    (tmp_path / "rafdb").mkdir()
    with pytest.raises(UserError, match=r"list_patition_label\.txt.*whdeng"):
        listing(RAFDBSpec(), tmp_path / "rafdb")


# ---------------------------------------------------------------- All-Age-Faces

FACES = "All-Age-Faces Dataset/aglined faces/"
SETS = "All-Age-Faces Dataset/image sets/"


def test_aaf_age_from_name_gender_from_image_sets(tmp_path):
    entries = listing(AAFSpec(), layouts.aaf(tmp_path))
    good = kept(entries)
    assert good[FACES + "00000A02.jpg"].labels == {"age": 2.0, "gender": TASKS["gender"].code_of("female")}
    assert good[FACES + "00001A35.jpg"].labels == {"age": 35.0, "gender": TASKS["gender"].code_of("male")}
    assert good[FACES + "00001A35.jpg"].split == TRAINVAL
    assert good[FACES + "07000A80.jpg"].split == "test"
    assert set(good) == {FACES + name for name in ("00000A02.jpg", "00001A35.jpg", "07000A80.jpg", "07002A44.jpg")}
    assert good[FACES + "07002A44.jpg"].labels == {"age": 44.0}  # its set line is malformed: unlisted


def test_aaf_bad_input_is_report_rows(tmp_path):
    entries = listing(AAFSpec(), layouts.aaf(tmp_path))
    rejects = {path: e.reject for path, e in entries.items() if e.reject}
    assert rejects == {
        FACES + "09999A30.jpg": "missing_file",
        FACES + "face.jpg": "malformed_name",
        FACES + "07001A20.jpg": "label_out_of_range",
        SETS + "val_.txt#line=3": "malformed_line",
    }


def test_aaf_image_named_twice_keeps_the_first_line(tmp_path):
    folder = layouts.aaf(tmp_path)
    with open(folder / "All-Age-Faces Dataset" / "image sets" / "val_.txt", "a") as handle:
        handle.write("00000A02.jpg 1\n")
    entries = listing(AAFSpec(), folder)
    assert entries[SETS + "val_.txt#line=4"].reject == "duplicate_line"
    assert entries[FACES + "00000A02.jpg"].labels["gender"] == TASKS["gender"].code_of("female")


def test_aaf_train_set_alone_is_hash_split(tmp_path):
    entries = listing(AAFSpec(), layouts.aaf(tmp_path, sets=("train_",)))
    good = kept(entries)
    assert {e.split for e in good.values()} == {None}
    unlisted = good[FACES + "07000A80.jpg"]
    assert unlisted.labels == {"age": 80.0} and unlisted.notes == ["gender missing (in no image-set file)"]


def test_aaf_chooses_the_image_set_pair(tmp_path):
    folder = layouts.aaf(tmp_path)
    with pytest.raises(UserError, match="train/val"):
        listing(AAFSpec(image_sets="train/val"), folder)
    layouts.write(folder / "All-Age-Faces Dataset" / "image sets" / "train.txt", b"07000A80.jpg 0\n")
    good = kept(listing(AAFSpec(image_sets="train/val"), folder))
    assert good[FACES + "07000A80.jpg"].labels["gender"] == TASKS["gender"].code_of("female")
    assert good[FACES + "00000A02.jpg"].notes and "gender" not in good[FACES + "00000A02.jpg"].labels


# ---------------------------------------------------------------- APPA-REAL


def test_appa_real_official_splits_real_and_apparent_age(tmp_path):
    folder = layouts.appa_real(tmp_path)
    good = kept(listing(APPARealSpec(), folder))
    assert good["train/000000.jpg_face.jpg"].labels == {"age": 5.0}
    assert [
        good[p].split for p in ("train/000000.jpg_face.jpg", "valid/004113.jpg_face.jpg", "test/005613.jpg_face.jpg")
    ] == ["train", "val", "test"]
    apparent = kept(listing(APPARealSpec(age="apparent"), folder))
    assert apparent["train/000000.jpg_face.jpg"].labels == {"age": 4.2}
    assert apparent["train/000002.jpg_face.jpg"].labels == {"age": 40.0}


def test_appa_real_bad_rows_are_report_rows(tmp_path):
    entries = listing(APPARealSpec(), layouts.appa_real(tmp_path))
    rejects = {path: e.reject for path, e in entries.items() if e.reject}
    assert rejects == {
        "train/000002.jpg_face.jpg": "label_out_of_range",
        "valid/004114.jpg_face.jpg": "malformed_label",
        "test/009999.jpg_face.jpg": "missing_file",
    }


def test_appa_real_without_test_csv_valid_is_test(tmp_path):
    good = kept(listing(APPARealSpec(), layouts.appa_real(tmp_path, parts=("train", "valid"))))
    assert good["train/000000.jpg_face.jpg"].split == TRAINVAL
    assert good["valid/004113.jpg_face.jpg"].split == "test"


def test_appa_manifest_val_becomes_test(tmp_path):
    entries = listing(APPA_MANIFEST, layouts.appa_manifest(tmp_path))
    assert [e.split for e in entries.values()] == [TRAINVAL, TRAINVAL, "test"]
    assert entries["val/000002.jpg"].labels == {"age": 61.0}


def test_new_formats_parse_from_yaml_like_dicts():
    cfg = IngestConfig(
        datasets=[
            {"format": "rafdb"},
            {"format": "aaf"},
            {"format": "appa_real", "age": "apparent"},
            APPA_MANIFEST.model_dump() | {"name": "appa_csv"},
        ]
    )
    assert [d.name for d in cfg.datasets] == ["rafdb", "aaf", "appa", "appa_csv"]
    assert [d.alignment for d in cfg.datasets[:3]] == ["detect_or_trust_crop", "detect_or_trust_crop", "detect"]


# ---------------------------------------------------------------- through the ingest stage


def test_bad_input_stays_report_rows_through_the_stage(tmp_path):
    layouts.rafdb(tmp_path)
    layouts.aaf(tmp_path)
    layouts.appa_real(tmp_path)
    layouts.appa_manifest(tmp_path)
    specs = [RAFDBSpec(), AAFSpec(), APPARealSpec(name="appa_real"), APPA_MANIFEST]
    summary = ingest.run(trusted_ingest_config(tmp_path, specs), str(tmp_path / "out"))
    faces, _labels, report = read_ingest_output(str(tmp_path / "out"))
    by_reason = {name: ds["rejected_by_reason"] for name, ds in report["datasets"].items()}
    assert by_reason == {
        "rafdb": {
            "label_out_of_range": 1,
            "malformed_label": 1,
            "malformed_line": 1,
            "missing_file": 1,
            "unknown_split": 1,
        },
        "aaf": {"label_out_of_range": 1, "malformed_line": 1, "malformed_name": 1, "missing_file": 1},
        "appa_real": {"label_out_of_range": 1, "malformed_label": 1, "missing_file": 1},
        "appa": {},
    }
    assert report["datasets"]["aaf"]["notes"] == {"gender missing (in no image-set file)": 1}
    assert all(row["reason"] and row["source_uri"] for row in report["rejects"])
    assert summary["written"] == len(faces) == 9 + 4 + 5 + 3
    rafdb_test = [f for f in faces if f["dataset"] == "rafdb" and f["split"] == "test"]
    assert len(rafdb_test) == 2 and all("/test_" in f["source_uri"] for f in rafdb_test)


# ---------------------------------------------------------------- the real copies in ../shared/data


@pytest.mark.realdata
def test_real_rafdb_lists_the_train_part():
    entries = listing(RAFDBSpec(), shared_dataset("rafdb"))
    assert len(entries) == 12271 and not any(e.reject for e in entries.values())
    counts = Counter(e.labels["expression"] for e in entries.values())
    assert set(counts) == set(range(7)) and counts.most_common(1)[0][0] == EXPRESSION("happy")
    assert counts[EXPRESSION("fear")] == min(counts.values())
    assert {e.split for e in entries.values()} == {None}


@pytest.mark.realdata
def test_real_aaf_lists_ages_and_genders():
    entries = listing(AAFSpec(), shared_dataset("aaf"))
    assert len(entries) == 10137 and not any(e.reject or e.notes for e in entries.values())
    ages = [e.labels["age"] for e in entries.values()]
    assert min(ages) >= 2 and max(ages) <= 80 and 25 < sum(ages) / len(ages) < 45
    genders = Counter(e.labels["gender"] for e in entries.values())
    assert set(genders) == {0, 1} and min(genders.values()) > 0.35 * len(entries)


@pytest.mark.realdata
def test_real_appa_through_csv_manifest():
    entries = listing(APPA_MANIFEST, shared_dataset("appa"))
    assert len(entries) == 5613 and not any(e.reject for e in entries.values())
    assert Counter(e.split for e in entries.values()) == {TRAINVAL: 4113, "test": 1500}
    ages = [e.labels["age"] for e in entries.values()]
    assert min(ages) >= 1 and max(ages) <= 100 and 20 < sum(ages) / len(ages) < 45
