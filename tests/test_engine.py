"""The training engine on tiny tables: data path, training, checkpoints, exact resume, outputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_settings
from safetensors.torch import load_file

from d2mtl import layout, store
from d2mtl.config.train import TrainConfig
from d2mtl.data import (
    EpochSampler,
    FaceDataset,
    FaceIndex,
    decode_jpeg,
    empty_targets,
    label_targets,
    make_loader,
    preprocess,
)
from d2mtl.engine import Trainer
from d2mtl.errors import UserError
from d2mtl.models import build_model, load_model
from d2mtl.stages import teacher

TASK_NAMES = ("age", "gender", "race", "expression")


def tiny_config(**overrides) -> TrainConfig:
    fixed = {"epochs": 2, "checkpoint_every": 3, "deterministic": True, "lr": {"range_steps": 8}}
    return TrainConfig(**tiny_train_settings(fixed, overrides))


# ---- data ---------------------------------------------------------------------------------------------


def test_decode_gives_three_channels_and_bad_bytes_a_user_error():
    import cv2

    _ok, gray = cv2.imencode(".jpg", np.full((20, 30), 128, np.uint8))
    image = decode_jpeg(gray.tobytes())
    assert image.shape == (3, 20, 30) and image.dtype == torch.uint8
    with pytest.raises(UserError, match="not a decodable JPEG"):
        decode_jpeg(b"not a jpeg")
    batch = preprocess([gray.tobytes()] * 2, 16, [0.5] * 3, [0.25] * 3)
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.float32
    assert batch.mean().item() == pytest.approx((128 / 255 - 0.5) / 0.25, abs=0.05)


def test_label_targets_take_exact_ages_and_age_groups():
    import pyarrow as pa

    from d2mtl.contracts import LABEL_SCHEMA

    labels = pa.Table.from_pylist(
        [
            {"sample_id": "a", "age": 31.0, "gender": 1},
            {"sample_id": "b", "age_low": 20.0, "age_high": 29.0, "expression": 3},
            {"sample_id": "c"},
        ],
        schema=LABEL_SCHEMA,
    )
    targets = label_targets(labels, np.array([0, 1, 2, -1]), TASK_NAMES)
    assert targets["age_low"][:2].tolist() == [31.0, 20.0] and targets["age_high"][:2].tolist() == [31.0, 29.0]
    assert targets["age_weight"].tolist() == [1, 1, 0, 0]
    assert targets["gender"].tolist() == [1, -1, -1, -1] and targets["gender_weight"].tolist() == [1, 0, 0, 0]
    assert targets["expression"].tolist() == [-1, 3, -1, -1]
    assert np.isnan(targets["age_low"][2:]).all()


def fake_index(sizes: dict[str, int], shard_rows: int) -> FaceIndex:
    """A FaceIndex without files: datasets labelled like UTKFace (age...) and FER2013 (expression)."""
    dataset = np.concatenate([[name] * n for name, n in sizes.items()]).astype(object)
    n = len(dataset)
    targets = empty_targets(n, TASK_NAMES)
    utk = dataset == "utk"
    targets["gender"][utk], targets["gender_weight"][utk] = 0, 1
    targets["expression"][~utk], targets["expression_weight"][~utk] = 0, 1
    return FaceIndex(
        faces="",
        shards=[f"s{i}" for i in range(-(-n // shard_rows))],
        sample_id=np.arange(n).astype(object),
        dataset=dataset,
        split=np.array(["train"] * n, object),
        shard=np.arange(n) // shard_rows,
        row=np.arange(n) % shard_rows,
        tasks=("gender", "expression"),
        targets=targets,
    )


def test_epoch_plan_is_deterministic_windowed_and_covers_every_row():
    index = fake_index({"utk": 300, "fer": 700}, shard_rows=50)
    sampler = EpochSampler(index, np.arange(1000), batch_size=10, seed=3, window=4)
    rows, seeds = sampler.plan(0)
    assert sorted(rows.tolist()) == list(range(1000))  # proportional: every row once
    assert np.array_equal(rows, EpochSampler(index, np.arange(1000), 10, seed=3, window=4).plan(0)[0])
    assert not np.array_equal(rows, sampler.plan(1)[0])
    shards = index.shard[rows]
    windows = [set(shards[i : i + 200]) for i in range(0, 1000, 200)]  # 4 shards x 50 rows
    assert all(len(w) <= 4 for w in windows)  # bounded memory: a window holds few shards
    assert all({"utk", "fer"} == set(index.dataset[rows[i : i + 200]]) for i in range(0, 1000, 200))
    sampler.set_epoch(0, start=95)
    expected = [
        list(zip(rows[i : i + 10].tolist(), seeds[i : i + 10].tolist(), strict=True)) for i in range(950, 1000, 10)
    ]
    assert list(sampler) == expected  # resumed at batch 95: the rest of the same plan


def test_an_epoch_trains_every_face_the_last_batch_partial():
    index = fake_index({"utk": 85}, shard_rows=50)
    batches = list(EpochSampler(index, np.arange(85), batch_size=64, seed=0))
    assert [len(b) for b in batches] == [64, 21] and sorted(row for b in batches for row, _ in b) == list(range(85))
    two_processes = EpochSampler(index, np.arange(65), 64, seed=0, world_size=2)  # a last batch of 1 row for 2
    assert len(two_processes) == 1 and two_processes.dropped == 1


def test_default_window_mixes_the_whole_table_even_when_shards_are_sorted_by_label():
    index = fake_index({"fer": 1400}, shard_rows=200)
    index.targets["expression"] = np.arange(1400) // 200  # one class per shard, as ingest writes FER2013
    whole, _ = EpochSampler(index, np.arange(1400), 70, seed=0).plan(0)
    windowed, _ = EpochSampler(index, np.arange(1400), 70, seed=0, window=1).plan(0)
    classes_per_batch = [
        len(set(index.targets["expression"][rows[i : i + 70]]))
        for rows in (whole, windowed)
        for i in range(0, 1400, 70)
    ]
    assert min(classes_per_batch[:20]) >= 6  # every batch sees (nearly) every class
    assert max(classes_per_batch[20:]) <= 2  # one-shard windows: one class (two where a batch spans two)


@pytest.mark.parametrize(
    "mix, temperature, utk_share",
    [
        ("proportional", 1.0, 0.1),
        ("dataset", 1.0, 0.5),
        ("task", 1.0, 0.5),
        ("temperature", 1.0, 0.1),
        ("temperature", 2.0, 0.25),
        ("temperature", 1000.0, 0.5),
    ],
)
def test_mixes_share_the_epoch_between_datasets(mix, temperature, utk_share):
    index = fake_index({"utk": 100, "fer": 900}, shard_rows=100)
    rows, _ = EpochSampler(index, np.arange(1000), 10, seed=0, mix=mix, samples=4000, temperature=temperature).plan(0)
    assert np.mean(index.dataset[rows] == "utk") == pytest.approx(utk_share, abs=0.03)  # T=2: 10 / (10 + 30)


def test_shard_cache_stays_bounded(tiny_tables):
    index = FaceIndex.load(tiny_tables["faces"], tiny_tables["labels"], TASK_NAMES)
    assert len(index.shards) == 4
    dataset = FaceDataset(index, 32, TrainConfig().augment, cache_shards=2)
    sampler = EpochSampler(index, index.rows("train"), 4, seed=0, window=2)
    batches = list(make_loader(dataset, sampler))
    assert len(dataset._cache) <= 2
    assert batches[0]["image"].shape == (4, 3, 32, 32) and batches[0]["image"].dtype == torch.uint8
    again = next(iter(make_loader(dataset, sampler)))
    assert torch.equal(again["image"], batches[0]["image"])  # augmentation seeded per sample


# ---- training -------------------------------------------------------------------------------------------


def test_a_few_steps_lower_the_loss(tiny_tables, tmp_path):
    cfg = tiny_config(lr={"schedule": "fixed", "lr": 3e-3})
    index = FaceIndex.load(tiny_tables["faces"], tiny_tables["labels"], cfg.task_names)
    trainer = Trainer(cfg, index, str(tmp_path / "out"), build_model(cfg))
    trainer.progress.peak_lr = cfg.lr.lr
    batch = next(iter(make_loader(trainer.train_data, EpochSampler(index, index.rows("train"), 16, seed=0))))
    first = trainer.train_step(batch)
    for _ in range(8):
        last = trainer.train_step(batch)
    assert set(first) == {"age", "gender", "race", "expression"}
    assert sum(last.values()) < 0.8 * sum(first.values())


def _train(tables, out, cfg) -> dict:
    return teacher.run(cfg, faces=tables["faces"], labels=tables["labels"], out=str(out))


def test_teacher_writes_a_complete_model_folder(tiny_tables, tmp_path):
    out = tmp_path / "teacher"
    result = _train(tiny_tables, out, tiny_config())
    assert {p.name for p in out.iterdir()} >= {
        layout.WEIGHTS_FILE,
        layout.MODEL_CARD,
        layout.CHECKPOINT_FILE,
        layout.TRAIN_METRICS,
        layout.TRAIN_CURVES,
        layout.LR_RANGE_PLOT,
    }
    _net, card = load_model(str(out))
    assert card.role == "teacher" and card.training.data.train["utk"]["age"] == 18
    assert card.training.faces["image_size"] == "32"  # the face table's settings, for predict
    assert set(card.metrics["test"]) >= {"age_mae", "gender_acc", "race_acc", "expression_acc"}
    metrics = json.loads((out / layout.TRAIN_METRICS).read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2] and len(metrics["lr"]["trace"]) == 10  # 36: 4 x 8 + 4
    assert metrics["lr"]["range_test"]["lrs"] and result["test"] == card.metrics["test"]
    assert (out / layout.TRAIN_CURVES).read_bytes()[:4] == b"\x89PNG"
    checkpoint = torch.load(out / layout.CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["progress"]["epoch"] == 2
    assert _train(tiny_tables, out, tiny_config(num_workers=1)) == result  # finished: kept, not retrained
    with pytest.raises(UserError, match=r"other settings \(epochs\)"):
        _train(tiny_tables, out, tiny_config(epochs=3))


def test_interrupt_and_resume_gives_the_same_state(tiny_tables, tmp_path, monkeypatch):
    cfg = tiny_config()
    _train(tiny_tables, tmp_path / "straight", cfg)

    steps = {"n": 0}
    original = Trainer.train_step

    def interrupted(self, batch, total_of=None):
        if total_of is None:  # a training step, not the range test
            steps["n"] += 1
            if steps["n"] == 4:  # the last checkpoint was at step 3, mid-epoch
                raise KeyboardInterrupt
        return original(self, batch, total_of)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_tables, tmp_path / "resumed", cfg)
    monkeypatch.undo()
    state = torch.load(tmp_path / "resumed" / layout.CHECKPOINT_FILE, weights_only=True)
    assert (state["progress"]["global_step"], state["progress"]["epoch"], state["progress"]["step_in_epoch"]) == (
        3,
        0,
        3,
    )
    assert not (tmp_path / "resumed" / layout.WEIGHTS_FILE).exists()

    _train(tiny_tables, tmp_path / "resumed", cfg.model_copy(update={"num_workers": 1}))
    straight = load_file(tmp_path / "straight" / layout.WEIGHTS_FILE)
    resumed = load_file(tmp_path / "resumed" / layout.WEIGHTS_FILE)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    history = [json.loads((tmp_path / run / layout.TRAIN_METRICS).read_text()) for run in ("straight", "resumed")]
    assert history[0]["history"] == history[1]["history"] and history[0]["lr"] == history[1]["lr"]


def test_single_task_baseline_trains_on_that_task_only(tiny_tables, tmp_path):
    result = _train(
        tiny_tables, tmp_path / "base", tiny_config(tasks=["expression"], epochs=1, lr={"schedule": "fixed"})
    )
    net, card = load_model(str(tmp_path / "base"))
    assert result["role"] == "baseline:expression" and list(net.heads) == ["expression"]
    assert set(card.training.data.train) == {"fer"} and set(result["test"]) >= {"expression_acc"}
    assert not (tmp_path / "base" / layout.LR_RANGE_PLOT).exists()


def test_teacher_reads_and_writes_s3(tiny_tables, s3_env):
    root = Path(tiny_tables["labels"]).parent
    for path in root.rglob("*"):
        if path.is_file():
            store.upload_file(path, "s3://bucket/ingest/" + path.relative_to(root).as_posix())
    tables = {"faces": "s3://bucket/ingest/faces", "labels": "s3://bucket/ingest/labels.parquet"}
    result = _train(tables, "s3://bucket/teacher", tiny_config(epochs=1, checkpoint_every=0))
    _net, card = load_model("s3://bucket/teacher")
    assert card.metrics["test"] == result["test"]
    state = torch.load(io.BytesIO(store.read_bytes("s3://bucket/teacher/" + layout.CHECKPOINT_FILE)), weights_only=True)
    assert state["progress"]["epoch"] == 1
