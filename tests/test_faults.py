"""Faults: a killed training run resumes where it stopped and ends with the same weights; the object store
fails in one clear line and never shows a partial object; two writers under one prefix never mix rows.
Determinism: the same inputs and settings give the same tables and the same trained network."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, free_port, kill_after_checkpoint, run_cli, start_s3_server, tiny_training_overrides
from generated.tables import make_tiny_tables, write_pseudo_table
from safetensors.torch import load_file

from d2mtl import contracts, layout, store
from d2mtl.config import load_experiment
from d2mtl.config.train import TrainConfig
from d2mtl.models import load_model
from d2mtl.stages import student, teacher


def assert_resumes_exactly(stage: str, args: list[str], straight: Path, out: Path, seed: int) -> None:
    """SIGKILL ``d2mtl <stage>`` at a random step, rerun it: it continues from its checkpoint and ends with the
    weights and the metric history of the uninterrupted run in ``straight``."""
    total = len(json.loads((straight / layout.TRAIN_METRICS).read_text())["lr"]["trace"])
    rng = np.random.default_rng(seed)
    command = [sys.executable, "-m", "d2mtl.cli", stage, *args, "--out", str(out)]
    for item in tiny_training_overrides(stage):
        command += ["--set", item]
    killed_at = kill_after_checkpoint(command, out / layout.CHECKPOINT_FILE, int(rng.integers(2, total // 2)), rng)
    assert 0 < killed_at < total and not (out / layout.WEIGHTS_FILE).exists()

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"checkpoint at {out}" in rerun.stderr and "LR range test" not in rerun.stderr  # resumed, not restarted
    final = torch.load(out / layout.CHECKPOINT_FILE, weights_only=True)["progress"]
    assert final["global_step"] == total and len(final["lr_trace"]) == total  # the step count continued
    expected, resumed = load_file(straight / layout.WEIGHTS_FILE), load_file(out / layout.WEIGHTS_FILE)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    histories = [json.loads((run / layout.TRAIN_METRICS).read_text())["history"] for run in (straight, out)]
    assert histories[0] == histories[1]


@pytest.mark.slow
def test_sigkilled_teacher_resumes_to_the_same_weights(tmp_path):
    tables = make_tiny_tables(tmp_path / "ingest")
    cfg = load_experiment("cpu", tiny_training_overrides("teacher")).teacher
    teacher.run(cfg, tables["faces"], tables["labels"], str(tmp_path / "straight"))
    assert_resumes_exactly(
        "teacher",
        ["--faces", tables["faces"], "--labels", tables["labels"]],
        tmp_path / "straight",
        tmp_path / "killed",
        seed=1,
    )


@pytest.mark.slow
def test_sigkilled_student_resumes_to_the_same_weights(tmp_path):
    tables = make_tiny_tables(tmp_path / "ingest")
    pseudo = str(tmp_path / "pseudo.parquet")
    write_pseudo_table(tables, pseudo)
    cfg = load_experiment("cpu", tiny_training_overrides("student")).student
    student.run(cfg, tables["faces"], tables["labels"], pseudo, str(tmp_path / "straight"))
    assert_resumes_exactly(
        "student",
        ["--faces", tables["faces"], "--labels", tables["labels"], "--pseudo", pseudo],
        tmp_path / "straight",
        tmp_path / "killed",
        seed=2,
    )


def test_two_cpu_training_runs_give_identical_metrics_and_weights(tiny_tables, tmp_path):
    cfg = load_experiment("cpu", [*tiny_training_overrides("teacher"), "teacher.epochs=1"]).teacher
    results = [
        teacher.run(cfg, tiny_tables["faces"], tiny_tables["labels"], str(tmp_path / run)) for run in ("one", "two")
    ]
    for result in results:
        del result["out"], result["train_seconds"]
    assert results[0] == results[1]
    one, two = (load_file(tmp_path / run / layout.WEIGHTS_FILE) for run in ("one", "two"))
    assert all(torch.equal(one[k], two[k]) for k in one)


# ---- the object store ---------------------------------------------------------------------------------


class StoppableS3:
    """An ``rclone serve s3`` this test may stop and start again on the same port and folder."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_s3_server(self.root, self.port, "faultkey", "faultsecret")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def stoppable_s3(tmp_path, monkeypatch):
    server = StoppableS3(tmp_path / "s3root")
    (server.root / "bucket").mkdir(parents=True)
    server.start()
    for name, value in (
        ("AWS_ENDPOINT_URL", server.endpoint),
        ("AWS_ACCESS_KEY_ID", "faultkey"),
        ("AWS_SECRET_ACCESS_KEY", "faultsecret"),
        ("AWS_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    store.configure(store.StoreSettings(retries=1, backoff_s=0.05))
    yield server
    server.stop()
    store.configure(store.StoreSettings())


class StopServerAfter:
    """A stream that stops the S3 server once ``limit`` bytes of it have been read (mid-upload)."""

    def __init__(self, stream, limit: int, server: StoppableS3):
        self.stream, self.limit, self.server, self.read_bytes = stream, limit, server, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        self.read_bytes += len(chunk)
        if self.read_bytes > self.limit:
            self.server.stop()
        return chunk


def test_store_stopped_during_upload_fails_cleanly_and_rerun_completes(tiny_tables, stoppable_s3, monkeypatch):
    from minio import Minio

    out = "s3://bucket/runs/teacher"
    put_object = Minio.put_object

    def stop_mid_weights(self, bucket, key, data, length, *args, **kwargs):
        if key.endswith(layout.WEIGHTS_FILE):  # 9 MB: a multipart upload, stopped after its first 5 MiB part
            data = StopServerAfter(data, 6 * 2**20, stoppable_s3)
        return put_object(self, bucket, key, data, length, *args, **kwargs)

    monkeypatch.setattr(Minio, "put_object", stop_mid_weights)
    cfg = TrainConfig(
        model={"weights": "none", "input_size": 32},
        batch_size=8,
        epochs=1,
        num_workers=0,
        progress=False,
        threads=1,
        checkpoint_every=0,
        lr={"schedule": "fixed"},
    )
    with pytest.raises(
        store.StoreError,
        match=rf"write {out}/{layout.WEIGHTS_FILE}: object store 127.0.0.1:\d+ "
        r"unreachable after 2 attempts",
    ) as err:
        teacher.run(cfg, tiny_tables["faces"], tiny_tables["labels"], out)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(Minio, "put_object", put_object)

    stoppable_s3.start()
    assert [uri.rsplit("/", 1)[-1] for uri in store.list_files(out)] == [layout.CHECKPOINT_FILE]
    assert not list(stoppable_s3.root.rglob(layout.WEIGHTS_FILE))  # no partial object on the server's disk either
    result = teacher.run(cfg, tiny_tables["faces"], tiny_tables["labels"], out)  # resumes from the epoch checkpoint
    _net, card = load_model(out)
    assert card.metrics["test"] == result["test"] and store.exists(f"{out}/{layout.TRAIN_METRICS}")


def test_a_retried_write_sends_the_whole_object_again(stoppable_s3, monkeypatch):
    """The first attempt fails after reading its stream; the retry must not send the exhausted stream."""
    from minio import Minio

    put_object, attempts = Minio.put_object, []

    def fail_first(self, bucket, key, data, length, *args, **kwargs):
        attempts.append(data.read())  # consumes the stream, as a failed upload does
        if len(attempts) == 1:
            raise ConnectionError("connection reset")
        return put_object(self, bucket, key, io.BytesIO(attempts[-1]), length, *args, **kwargs)

    monkeypatch.setattr(Minio, "put_object", fail_first)
    store.write_bytes("s3://bucket/retried.bin", b"x" * 1000)
    assert attempts == [b"x" * 1000] * 2 and store.read_bytes("s3://bucket/retried.bin") == b"x" * 1000


def test_unreachable_store_is_bounded_retries_then_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    started = time.perf_counter()
    code, err = run_cli(
        [
            "teacher",
            "--set",
            "store.retries=3",
            "--set",
            "store.backoff_s=0.1",
            "--faces",
            "s3://bucket/faces",
            "--labels",
            "s3://bucket/labels.parquet",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    elapsed = time.perf_counter() - started
    assert code == 2 and "\n" not in err and "unreachable after 4 attempts" in err
    assert 0.1 + 0.2 + 0.4 <= elapsed < 10  # the backoff doubled between attempts, and it ended


def test_stalled_store_times_out_per_attempt(monkeypatch):
    """A server that accepts the connection and never answers: each attempt ends at the read timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
        store.configure(store.StoreSettings(retries=1, backoff_s=0.05, read_timeout_s=0.5))
        started = time.perf_counter()
        try:
            with pytest.raises(store.StoreError, match="unreachable after 2 attempts"):
                store.read_bytes("s3://bucket/x")
        finally:
            store.configure(store.StoreSettings())
    assert time.perf_counter() - started < 5


def test_wrong_credentials_through_the_cli_one_line_without_the_secret(s3_env, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-4711")
    code, err = run_cli(
        ["teacher", "--faces", "s3://bucket/faces", "--labels", "s3://bucket/labels.parquet", "--out", str(tmp_path)],
        capsys,
    )
    assert code == 2 and "\n" not in err
    assert "access denied" in err and "AWS_SECRET_ACCESS_KEY" in err and "wrong-secret-4711" not in err


# ---- two runs under one prefix ----------------------------------------------------------------------------


def face_row(sample_id: str) -> dict:
    return {
        "sample_id": sample_id,
        "dataset": sample_id[0],
        "domain": "d",
        "split": "train",
        "subject": None,
        "image": sample_id.encode(),
        "source_uri": "u",
        "det_score": None,
        "box": None,
        "landmarks": None,
        "alignment": "trusted_crop",
    }


@pytest.mark.parametrize("last", ["a", "b"])
def test_two_face_table_writers_under_one_prefix_never_mix(tmp_path, last):
    uri = str(tmp_path / "faces")
    writers = {run: contracts.FaceTableWriter(uri, shard_rows=2) for run in "ab"}
    for i in range(5):  # interleaved shard by shard, as two concurrent runs would
        for run, writer in writers.items():
            writer.write(face_row(f"{run}-{i}"))
    writers["b" if last == "a" else "a"].close()
    manifest = writers[last].close()
    rows = [r["sample_id"] for batch in contracts.iter_face_batches(uri) for r in batch.to_pylist()]
    assert rows == [f"{last}-{i}" for i in range(5)] and manifest["rows"] == 5
    assert all(len(s["sha256"]) == 64 and s["path"].startswith("part-") for s in manifest["shards"])


def test_two_runs_publish_under_their_own_run_ids_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from d2mtl_pipeline import steps

    prefix = str(tmp_path / "published")
    sources = {}
    for run in ("run-a", "run-b"):
        tables = make_tiny_tables(tmp_path / run, per_dataset=4, seed=len(sources))
        sources[run] = SimpleNamespace(path=tables["faces"], name="faces")
    settings = store.StoreSettings().model_dump_json()
    with ThreadPoolExecutor(2) as pool:
        published = list(
            pool.map(lambda run: steps.publish(settings, sources[run], prefix, run, "ingest", "faces"), sources)
        )
    assert len(set(published)) == 2
    for run, uri in zip(sources, published, strict=True):
        assert uri.startswith(str(Path(prefix, run)))
        assert contracts.read_manifest(uri) == contracts.read_manifest(sources[run].path)


# ---- determinism ------------------------------------------------------------------------------------------


def test_two_ingests_give_identical_content_hashes(tmp_path):
    from hashlib import sha256

    from generated import layouts

    from d2mtl.config.ingest import FER2013FolderSpec, IngestConfig, UTKFaceSpec
    from d2mtl.stages import ingest

    layouts.utkface(tmp_path)
    layouts.fer_folder(tmp_path, per_class=2)
    specs = [spec.model_copy(update={"alignment": "trust_crop"}) for spec in (UTKFaceSpec(), FER2013FolderSpec())]
    cfg = IngestConfig(data_root=str(tmp_path), image_size=32, workers=1, shard_rows=8, datasets=specs)
    hashes = []
    for run in ("one", "two"):
        out = str(tmp_path / run)
        ingest.run(cfg, out)
        manifest = contracts.read_manifest(layout.faces(out))
        hashes.append(
            (
                [shard["sha256"] for shard in manifest["shards"]],
                sha256(store.read_bytes(layout.labels(out))).hexdigest(),
            )
        )
    assert hashes[0] == hashes[1] and len(hashes[0][0]) > 1
