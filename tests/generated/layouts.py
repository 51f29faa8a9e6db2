"""Tiny generated datasets in the real on-disk layouts the ingest adapters read.

Images are small noise pictures (``learnable_utkface_fer``: noise whose brightness carries the labels): no face
detector finds a face in them, so tests that need a written row use the ``trust_crop`` policy; real detection is
tested on ../shared/data.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

FER_EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def image_bytes(seed: int, size: int = 40, gray: bool = False, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size) if gray else (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def learnable_utkface_fer(root: Path, per_dataset: int = 64, seed: int = 0) -> Path:
    """UTKFace and FER2013 folder layouts of generated faces whose brightness carries the labels (the pipeline
    tests' and the ``--smoke`` benchmarks' data)."""
    rng = np.random.default_rng(seed)
    for i in range(per_dataset):
        age, gender, race = int(rng.integers(1, 90)), int(rng.integers(0, 2)), int(rng.integers(0, 5))
        face = rng.normal(40 + 150 * gender + age / 3, 20, (200, 200, 3))
        _write_image(root / "utkface" / f"{age}_{gender}_{race}_2017010{i % 10}1{i:08d}.jpg.chip.jpg", face)
    for i in range(per_dataset):
        code = int(rng.integers(0, len(FER_EMOTIONS)))
        part, prefix = ("test", "PublicTest") if i % 5 == 0 else ("train", "Training")
        face = np.repeat(rng.normal(30 + 28 * code, 20, (48, 48, 1)), 3, axis=2)
        _write_image(root / "fer2013" / part / FER_EMOTIONS[code] / f"{prefix}_{i:06d}.jpg", face)
    return root


def _write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.clip(image, 0, 255).astype(np.uint8)):
        raise OSError(f"could not write {path}")


def utkface(root: Path) -> Path:
    """5 good names (one with a space, one without the dot, one without race) + 2 bad ones."""
    folder = root / "utkface"
    names = [
        "25_0_2_20170116174525125.jpg.chip.jpg",
        "3_1_0_20170109150557335.jpg.chip.jpg",
        "24_0_1_20170116220224657 .jpg.chip.jpg",
        "55_0_0_20170116232725357jpg.chip.jpg",
        "61_1_20170109142408075.jpg.chip.jpg",
        "face.jpg.chip.jpg",
        "30_7_0_20170116174525126.jpg.chip.jpg",
    ]
    for i, name in enumerate(names):
        write(folder / name, image_bytes(i))
    return folder


def fer_folder(root: Path, per_class: int = 2) -> Path:
    folder = root / "fer2013"
    for split, prefix in (("train", "Training"), ("test", "PublicTest")):
        for c, emotion in enumerate(FER_EMOTIONS):
            for i in range(per_class):
                write(folder / split / emotion / f"{prefix}_{c}{i:04d}.jpg", image_bytes(c * 100 + i, 48, gray=True))
    return folder


def fer_csv(path: Path, rows: list[tuple[str, str, str]] | None = None) -> Path:
    """``emotion,pixels,Usage`` rows; default: 3 good rows (one per usage)."""
    rng = np.random.default_rng(0)
    good = " ".join(str(v) for v in rng.integers(0, 256, 48 * 48))
    rows = rows or [("3", good, "Training"), ("0", good, "PublicTest"), ("6", good, "PrivateTest")]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["emotion", "pixels", "Usage"])
    writer.writerows(rows)
    return write(path, buffer.getvalue().encode())


def ckplus(root: Path) -> Path:
    folder = root / "ckplus"
    for s, subject in enumerate(("S005", "S010", "S011", "S022")):
        for e, emotion in enumerate(("anger", "happy", "contempt")):
            write(folder / emotion / f"{subject}_001_00000011.png", image_bytes(s * 3 + e, 48, gray=True, fmt="PNG"))
    return folder


def jaffe(root: Path) -> Path:
    folder = root / "jaffe"
    for i, name in enumerate(["KA.AN1.39.tiff", "KA.HA2.30.tiff", "KL.SU1.164.tiff", "YM.NE3.51.tiff", "README.txt"]):
        write(folder / name, b"JAFFE images" if name.endswith(".txt") else image_bytes(i, 64, True, "TIFF"))
    return folder


def adience(root: Path) -> Path:
    folder = root / "adience"
    header = [
        "user_id",
        "original_image",
        "face_id",
        "age",
        "gender",
        "x",
        "y",
        "dx",
        "dy",
        "tilt_ang",
        "fiducial_yaw_angle",
        "fiducial_score",
    ]
    rows = {
        0: [("u1", "a.jpg", "1", "(25, 32)", "f"), ("u1", "b.jpg", "2", "35", "m")],
        3: [("u2", "c.jpg", "3", "(0, 2)", "u")],
        4: [("u3", "d.jpg", "4", "None", ""), ("u3", "e.jpg", "5", "(8, 12)", "x")],
    }
    for fold, fold_rows in rows.items():
        lines = ["\t".join(header)]
        for user, image, face, age, gender in fold_rows:
            lines.append("\t".join([user, image, face, age, gender, "0", "0", "10", "10", "0", "0", "50"]))
            write(folder / "aligned" / user / f"landmark_aligned_face.{face}.{image}", image_bytes(int(face), 64))
        write(folder / f"fold_{fold}_data.txt", ("\n".join(lines) + "\n").encode())
    return folder


def fairface(root: Path) -> Path:
    folder = root / "fairface"
    parts = {
        "train": [
            ("1.jpg", "20-29", "Male", "East Asian"),
            ("2.jpg", "more than 70", "Female", "Latino_Hispanic"),
            ("3.jpg", "3-9", "Female", "Martian"),
        ],
        "val": [("1.jpg", "0-2", "Male", "White")],
    }
    for part, rows in parts.items():
        lines = ["file,age,gender,race,service_test"]
        for i, (name, age, gender, race) in enumerate(rows):
            lines.append(f"{part}/{name},{age},{gender},{race},True")
            write(folder / part / name, image_bytes(i, 64))
        write(folder / f"fairface_label_{part}.csv", ("\n".join(lines) + "\n").encode())
    return folder


def image_folder(root: Path) -> Path:
    folder = root / "moods"
    for i, emotion in enumerate(("happy", "sad", "bored")):
        write(folder / emotion / f"{i}.jpg", image_bytes(i))
    return folder


def manifest(root: Path) -> Path:
    folder = root / "manifest"
    for i in range(3):
        write(folder / "img" / f"{i}.jpg", image_bytes(i))
    write(
        folder / "labels.csv",
        b"path,age,gender,expression,split\nimg/0.jpg,31,female,,train\nimg/1.jpg,,1,happy,test\nimg/2.jpg,250,,,val\n",
    )
    return folder


def rafdb(root: Path, test_part: bool = True) -> Path:
    """The official ``basic/`` layout: one good line per code 1-7 (train_), two test_ lines (unless
    ``test_part`` is false), and bad lines: a missing image, code 8, code x, a malformed line, a val_ name."""
    folder = root / "rafdb"
    names = [f"train_{i:05d}.jpg" for i in range(1, 8)] + (["test_0001.jpg", "test_0002.jpg"] if test_part else [])
    lines = [f"{name} {code}" for code, name in enumerate(names[:7], 1)] + [f"{n} 7" for n in names[7:]]
    for i, name in enumerate(names):
        write(folder / "basic" / "Image" / "aligned" / name.replace(".jpg", "_aligned.jpg"), image_bytes(i, 100))
    for i, name in enumerate(("train_00008.jpg", "train_00009.jpg", "val_00001.jpg"), 8):
        write(folder / "basic" / "Image" / "aligned" / name.replace(".jpg", "_aligned.jpg"), image_bytes(i, 100))
    lines += ["train_00099.jpg 4", "train_00008.jpg 8", "train_00009.jpg x", "train_00010.jpg", "val_00001.jpg 1"]
    write(folder / "basic" / "EmoLabel" / "list_patition_label.txt", ("\n".join(lines) + "\n").encode())
    return folder


def aaf(root: Path, sets: tuple[str, ...] = ("train_", "val_")) -> Path:
    """``All-Age-Faces Dataset/``: 4 labelled images, one unlisted, one badly named, and bad set lines
    (an absent file, gender 2, a malformed line)."""
    folder = root / "aaf" / "All-Age-Faces Dataset"
    images = ["00000A02.jpg", "00001A35.jpg", "07000A80.jpg", "07001A20.jpg", "07002A44.jpg", "face.jpg"]
    for i, name in enumerate(images):
        write(folder / "aglined faces" / name, image_bytes(i, 64))
    set_lines = {
        "train_": ["00000A02.jpg 0", "00001A35.jpg 1", "09999A30.jpg 1", "face.jpg 0"],
        "val_": ["07000A80.jpg 1", "07001A20.jpg 2", "07002A44.jpg"],
    }
    for name in sets:
        write(folder / "image sets" / f"{name}.txt", ("\n".join(set_lines[name]) + "\n").encode())
    return root / "aaf"


def appa_real(root: Path, parts: tuple[str, ...] = ("train", "valid", "test")) -> Path:
    """The official release: per part two good rows, and bad rows (age 130, age 'n/a', a missing image)."""
    folder = root / "appa-real-release"
    rows = {
        "train": [("000000.jpg", "4.2", "5"), ("000001.jpg", "30.5", "28"), ("000002.jpg", "40", "130")],
        "valid": [("004113.jpg", "60", "61"), ("004114.jpg", "n/a", "n/a")],
        "test": [("005613.jpg", "15.1", "16"), ("005614.jpg", "20", "20"), ("009999.jpg", "20", "20")],
    }
    for part in parts:
        lines = ["file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age"]
        for i, (name, apparent, real) in enumerate(rows[part]):
            lines.append(f"{name},38,{apparent},3.1,{real}")
            if name != "009999.jpg":
                write(folder / part / f"{name}_face.jpg", image_bytes(i, 80))
                write(folder / part / name, image_bytes(i, 200))
        write(folder / f"gt_avg_{part}.csv", ("\n".join(lines) + "\n").encode())
    return folder


def appa_manifest(root: Path) -> Path:
    """The ../shared/data copy: ``labels.csv`` (path,age,split) with the release's train / val parts."""
    folder = root / "appa"
    for i, part in enumerate(("train", "train", "val")):
        write(folder / part / f"{i:06d}.jpg", image_bytes(i, 80))
    write(
        folder / "labels.csv",
        b"path,age,split\ntrain/000000.jpg,4,train\ntrain/000001.jpg,18,train\nval/000002.jpg,61,val\n",
    )
    return folder
