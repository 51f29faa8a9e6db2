"""Dataset adapters on tiny generated copies of each real layout; trees: folders, archives, s3://."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from generated import layouts

from d2mtl import store
from d2mtl.config.ingest import (
    AdienceSpec,
    CKPlusSpec,
    CsvManifestSpec,
    DatasetConfig,
    FairFaceSpec,
    FER2013CsvSpec,
    FER2013FolderSpec,
    ImageFolderSpec,
    JAFFESpec,
    UTKFaceSpec,
)
from d2mtl.errors import UserError
from d2mtl.sources import SOURCES, TRAINVAL, Rejected, open_tree
from d2mtl.sources.trees import ArchiveError
from d2mtl.sources.utkface import parse_name


def listing(spec, uri) -> dict:
    with open_tree(str(uri)) as tree:
        assert tree is not None, uri
        return {entry.path: entry for entry in SOURCES[spec.format](spec, tree).entries()}


def test_every_config_format_has_an_adapter():
    formats = {model.model_fields["format"].default for model in DatasetConfig.__origin__.__args__}
    assert formats == set(SOURCES)


@pytest.mark.parametrize(
    ("name", "labels", "notes"),
    [
        ("25_0_2_20170116174525125.jpg.chip.jpg", {"age": 25.0, "gender": 0, "race": 2}, []),
        ("24_0_1_20170116220224657 .jpg.chip.jpg", {"age": 24.0, "gender": 0, "race": 1}, []),
        ("55_0_0_20170116232725357jpg.chip.jpg", {"age": 55.0, "gender": 0, "race": 0}, []),
        ("61_1_20170109142408075.jpg.chip.jpg", {"age": 61.0, "gender": 1}, ["race missing in file name"]),
    ],
)
def test_utkface_names_keep_what_parses(name, labels, notes):
    assert parse_name(name) == (labels, notes)


def test_utkface_rejects_malformed_and_out_of_range(tmp_path):
    entries = listing(UTKFaceSpec(), layouts.utkface(tmp_path))
    assert len(entries) == 7
    assert entries["face.jpg.chip.jpg"].reject == "malformed_name"
    assert entries["30_7_0_20170116174525126.jpg.chip.jpg"].reject == "label_out_of_range"
    assert sum(e.reject is None for e in entries.values()) == 5
    assert all(e.split is None and e.subject is None for e in entries.values())


def test_fer_folder_official_splits_and_classes(tmp_path):
    folder = layouts.fer_folder(tmp_path)
    layouts.write(folder / "train" / "contempt" / "Training_1.jpg", layouts.image_bytes(1))
    layouts.write(folder / "notes.txt", b"x")
    entries = listing(FER2013FolderSpec(), folder)
    assert entries["train/happy/Training_30000.jpg"].labels == {"expression": 3}
    assert entries["train/happy/Training_30000.jpg"].split == TRAINVAL
    assert entries["test/neutral/PublicTest_60001.jpg"].split == "test"
    assert entries["train/contempt/Training_1.jpg"].reject == "unknown_class"
    assert entries["notes.txt"].reject == "unexpected_path"


def test_fer_csv_usage_splits_and_pixels(tmp_path):
    good = " ".join(["7"] * 2304)
    layouts.fer_csv(
        tmp_path / "fer2013" / "fer2013.csv",
        [
            ("3", good, "Training"),
            ("0", good, "PublicTest"),
            ("6", good, "PrivateTest"),
            ("9", good, "Training"),
            ("1", good, "Secret"),
            ("2", "1 2 3", "Training"),
        ],
    )
    spec = FER2013CsvSpec()
    with open_tree(str(tmp_path / "fer2013")) as tree:
        source = SOURCES[spec.format](spec, tree)
        entries = list(source.entries())
        assert [e.split for e in entries[:3]] == [TRAINVAL, "test", "test"]
        assert [e.reject for e in entries[3:]] == ["label_out_of_range", "unknown_split", None]
        assert entries[0].path == "fer2013.csv#row=0"
        kept = [e for e in entries if e.reject is None]
        payloads = list(source.payloads(kept))
    assert payloads[0].shape == (48, 48) and payloads[0].max() == 7
    assert isinstance(payloads[-1], Rejected) and payloads[-1].reason == "unreadable_image"


def test_fer_csv_missing_columns_is_one_clear_error(tmp_path):
    layouts.write(tmp_path / "fer2013" / "fer2013.csv", b"emotion,Usage\n3,Training\n")
    with pytest.raises(UserError, match=r"missing column.*pixels"):
        listing(FER2013CsvSpec(), tmp_path / "fer2013")


def test_ckplus_subjects_and_contempt(tmp_path):
    folder = layouts.ckplus(tmp_path)
    dropped = listing(CKPlusSpec(), folder)
    assert dropped["contempt/S005_001_00000011.png"].reject == "dropped_class"
    assert dropped["anger/S010_001_00000011.png"].labels == {"expression": 0}
    assert dropped["anger/S010_001_00000011.png"].subject == "S010"
    mapped = listing(CKPlusSpec(contempt="disgust"), folder)
    assert mapped["contempt/S005_001_00000011.png"].labels == {"expression": 1}


def test_jaffe_codes_in_file_names(tmp_path):
    entries = listing(JAFFESpec(), layouts.jaffe(tmp_path))
    assert entries["KA.HA2.30.tiff"].labels == {"expression": 3}
    assert entries["KL.SU1.164.tiff"].subject == "KL"
    assert entries["README.txt"].reject == "malformed_name"


def test_adience_folds_age_groups_and_gender(tmp_path):
    entries = {e.path.split("/")[-1]: e for e in listing(AdienceSpec(), layouts.adience(tmp_path)).values()}
    assert entries["landmark_aligned_face.1.a.jpg"].labels == {"age_low": 25.0, "age_high": 32.0, "gender": 1}
    assert entries["landmark_aligned_face.1.a.jpg"].split == "train"
    assert entries["landmark_aligned_face.2.b.jpg"].labels == {"age": 35.0, "gender": 0}
    assert entries["landmark_aligned_face.3.c.jpg"].split == "val"  # fold 3; gender u -> null
    assert entries["landmark_aligned_face.3.c.jpg"].labels == {"age_low": 0.0, "age_high": 2.0}
    assert entries["landmark_aligned_face.4.d.jpg"].notes == ["no age or gender label"]
    assert entries["landmark_aligned_face.4.d.jpg"].split == "test"
    assert entries["landmark_aligned_face.5.e.jpg"].reject == "unknown_class"


def test_adience_without_fold_files_says_what_to_download(tmp_path):
    layouts.write(tmp_path / "adience" / "aligned" / "u1" / "x.jpg", layouts.image_bytes(0))
    with pytest.raises(UserError, match=r"fold_\*_data\.txt.*talhassner"):
        listing(AdienceSpec(), tmp_path / "adience")


def test_fairface_age_groups_race_mapping_and_splits(tmp_path):
    entries = listing(FairFaceSpec(), layouts.fairface(tmp_path))
    assert entries["train/1.jpg"].labels == {"age_low": 20.0, "age_high": 29.0, "gender": 0, "race": 2}
    assert entries["train/1.jpg"].split == TRAINVAL
    assert entries["train/2.jpg"].labels == {"age_low": 70.0, "age_high": 120.0, "gender": 1, "race": 4}
    assert entries["train/3.jpg"].reject == "unknown_class"
    assert entries["val/1.jpg"].split == "test"
    unmapped = listing(FairFaceSpec(race_map={"White": None, "East Asian": "asian"}), tmp_path / "fairface")
    assert "race" not in unmapped["val/1.jpg"].labels and unmapped["val/1.jpg"].notes == ["race White mapped to null"]


def test_image_folder_classes_from_folder_names(tmp_path):
    entries = listing(ImageFolderSpec(name="moods", path="moods"), layouts.image_folder(tmp_path))
    assert entries["happy/0.jpg"].labels == {"expression": 3}
    assert entries["bored/2.jpg"].reject == "unknown_class"
    with pytest.raises(UserError, match="classification task"):
        listing(ImageFolderSpec(name="moods", path="moods", task="age"), tmp_path / "moods")


def test_csv_manifest_names_codes_and_ranges(tmp_path):
    spec = CsvManifestSpec(name="m", path="manifest", split_column="split")
    entries = listing(spec, layouts.manifest(tmp_path))
    assert entries["img/0.jpg"].labels == {"age": 31.0, "gender": 1}
    assert entries["img/1.jpg"].labels == {"gender": 1, "expression": 3} and entries["img/1.jpg"].split == "test"
    assert entries["img/2.jpg"].reject == "label_out_of_range"
    with pytest.raises(UserError, match=r"missing column.*who"):
        listing(CsvManifestSpec(name="m", path="manifest", path_column="who"), tmp_path / "manifest")


# ---------------------------------------------------------------- trees and archives


def test_zip_and_tar_give_the_folder_paths(tmp_path):
    folder = layouts.utkface(tmp_path / "src")
    expected = sorted(p.name for p in folder.iterdir())
    with zipfile.ZipFile(tmp_path / "utk.zip", "w") as archive:
        for path in folder.iterdir():
            archive.write(path, f"UTKFace/{path.name}")
    with tarfile.open(tmp_path / "utk.tar.gz", "w:gz") as archive:
        archive.add(folder, arcname="UTKFace")
    for name in ("utk.zip", "utk.tar.gz"):
        with open_tree(str(tmp_path / name)) as tree:
            assert tree.files() == expected
            first = expected[0]
            assert tree.read(first) == (folder / first).read_bytes()
            assert tree.uri(first) == f"{tmp_path / name}!UTKFace/{first}"


def test_missing_folder_falls_back_to_archive_beside_it(tmp_path):
    with zipfile.ZipFile(tmp_path / "jaffe.zip", "w") as archive:
        archive.writestr("KA.AN1.39.tiff", layouts.image_bytes(0, fmt="TIFF"))
    with open_tree(str(tmp_path / "jaffe")) as tree:
        assert tree.files() == ["KA.AN1.39.tiff"]
    with open_tree(str(tmp_path / "nothing")) as tree:
        assert tree is None
    (tmp_path / "labels.csv").write_text("path\n")
    with pytest.raises(UserError, match="is a file"), open_tree(str(tmp_path / "labels.csv")):
        pass


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(path, "w") as archive:
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_tar_refuses_members_escaping(tmp_path, kind):
    member = tarfile.TarInfo({"absolute": "/etc/evil", "dotdot": "../evil", "symlink": "link"}[kind])
    if kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "../../outside"
    _tar_with(tmp_path / "bad.tar", member, b"" if kind == "symlink" else b"x")
    with pytest.raises(ArchiveError, match="unsafe member"), open_tree(str(tmp_path / "bad.tar")):
        pass
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_zip_refuses_dotdot_members(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as archive:
        archive.writestr("../evil.jpg", b"x")
    with pytest.raises(ArchiveError, match=r"unsafe member '\.\./evil\.jpg'"), open_tree(str(tmp_path / "bad.zip")):
        pass


@pytest.mark.parametrize("name", ["broken.zip", "broken.tar.gz"])
def test_unreadable_archive_is_one_clear_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not an archive")
    with pytest.raises(ArchiveError, match=r"cannot (open|read) archive"), open_tree(str(tmp_path / name)):
        pass


def test_s3_prefix_tree(s3_env, tmp_path):
    folder = layouts.jaffe(tmp_path)
    for path in sorted(folder.iterdir()):
        store.write_bytes(f"s3://bucket/data/jaffe/{path.name}", path.read_bytes())
    entries = listing(JAFFESpec(), "s3://bucket/data/jaffe")
    assert sorted(entries) == sorted(p.name for p in folder.iterdir())
    assert entries["KA.AN1.39.tiff"].source_uri == "s3://bucket/data/jaffe/KA.AN1.39.tiff"
    with open_tree("s3://bucket/data/jaffe") as tree:
        assert tree.read("KA.AN1.39.tiff") == (folder / "KA.AN1.39.tiff").read_bytes()


def test_folder_tree_ignores_hidden_files(tmp_path):
    folder = layouts.jaffe(tmp_path)
    (folder / ".DS_Store").write_bytes(b"x")
    with open_tree(str(folder)) as tree:
        assert ".DS_Store" not in tree.files()
    assert os.path.exists(folder / ".DS_Store")
