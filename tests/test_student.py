"""Student training: kept pseudo-labels fill only missing ground truth, on train faces only."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import tiny_train_settings

from d2mtl import contracts
from d2mtl.config.train import StudentConfig
from d2mtl.data import FaceIndex
from d2mtl.errors import UserError
from d2mtl.models import build_model, load_model, save_model
from d2mtl.stages import student
from d2mtl.tasks import TASKS


def student_config(**overrides) -> StudentConfig:
    fixed = {"epochs": 1, "lr": {"schedule": "fixed"}, "checkpoint_every": 0}
    return StudentConfig(**tiny_train_settings(fixed, overrides))


def pseudo_table(tables: dict[str, str]) -> pa.Table:
    """Every face predicted for every task: gender 'female' (p 0.9), expression 'happy' (p 0.6), age 40 +- 3.
    Kept everywhere, also where the ground truth has the label (the student must ignore those)."""
    faces = contracts.read_face_columns(tables["faces"], ["sample_id", "dataset"])
    rows = []
    for sample_id, dataset in zip(
        faces.column("sample_id").to_pylist(), faces.column("dataset").to_pylist(), strict=True
    ):
        row = {"sample_id": sample_id, "dataset": dataset, "age": 40.0, "age_spread": 3.0, "age_kept": True}
        for task in ("gender", "race", "expression"):
            probs = np.full(TASKS[task].num_classes, 0.1 / (TASKS[task].num_classes - 1), np.float32)
            code = {"gender": 1, "race": 2, "expression": 3}[task]
            probs[code] = {"gender": 0.9, "race": 0.5, "expression": 0.6}[task]
            probs /= probs.sum()
            row.update(
                {
                    task: code,
                    f"{task}_confidence": float(probs[code]),
                    f"{task}_probs": probs.tolist(),
                    f"{task}_kept": task != "race",
                }
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=contracts.PSEUDO_SCHEMA)


def test_ground_truth_wins_and_only_train_faces_get_pseudo_labels(tiny_tables):
    cfg = student_config(pseudo_weight=0.5)
    index = FaceIndex.load(tiny_tables["faces"], tiny_tables["labels"], cfg.task_names)
    truth = {k: v.copy() for k, v in index.targets.items()}
    train = np.flatnonzero(index.split == "train")
    used = student.apply_pseudo_labels(index, pseudo_table(tiny_tables), train, cfg)

    utk, fer = index.dataset == "utk", index.dataset == "fer"
    is_train = index.split == "train"
    for task in ("age", "gender", "race"):
        assert np.array_equal(index.targets[f"{task}_weight"][utk], truth[f"{task}_weight"][utk])  # GT kept
    assert np.array_equal(index.targets["gender"][utk], truth["gender"][utk])
    assert np.array_equal(index.targets["expression"][fer], truth["expression"][fer])
    assert (index.targets["gender"][fer & is_train] == 1).all()
    assert (index.targets["expression"][utk & is_train] == 3).all()
    assert (index.targets["gender_weight"][fer & ~is_train] == 0).all()  # val / test stay ground truth
    assert (index.targets["race_weight"][fer] == 0).all()  # not kept -> not used
    assert index.targets["gender_weight"][fer & is_train] == pytest.approx(0.5 * 0.9)  # pseudo weight x confidence
    assert index.targets["gender_soft"][fer & is_train].all()
    assert index.targets["age_low"][fer & is_train] == pytest.approx(37.0)  # soft: the teacher's band
    assert used["gender"] == {"used": 18, "ignored_ground_truth": 18}
    assert used["race"] == {"used": 0, "ignored_ground_truth": 0}


def test_hard_targets_without_confidence_weighting(tiny_tables):
    cfg = student_config(targets="hard", confidence_weighting=False)
    index = FaceIndex.load(tiny_tables["faces"], tiny_tables["labels"], cfg.task_names)
    student.apply_pseudo_labels(index, pseudo_table(tiny_tables), np.flatnonzero(index.split == "train"), cfg)
    rows = (index.dataset == "fer") & (index.split == "train")
    assert not index.targets["gender_soft"][rows].any() and (index.targets["gender_weight"][rows] == 1.0).all()
    assert (index.targets["age_low"][rows] == 40.0).all() and (index.targets["age_high"][rows] == 40.0).all()


def test_student_trains_on_ground_truth_and_pseudo_labels(tiny_tables, tmp_path):
    pseudo_uri = str(tmp_path / "pseudo.parquet")
    contracts.write_table(pseudo_table(tiny_tables), pseudo_uri, contracts.PSEUDO)
    result = student.run(
        student_config(), tiny_tables["faces"], tiny_tables["labels"], pseudo_uri, str(tmp_path / "student")
    )
    _net, card = load_model(str(tmp_path / "student"))
    assert result["role"] == "student" and card.pseudo_labels["expression"].used == 18
    assert card.sources.pseudo == pseudo_uri
    assert result["test"]["gender_n"] == 3  # ground truth only: the 3 utk test faces


def test_student_starts_from_the_teacher(tiny_tables, tmp_path):
    pseudo_uri = str(tmp_path / "pseudo.parquet")
    contracts.write_table(pseudo_table(tiny_tables), pseudo_uri, contracts.PSEUDO)
    cfg = student_config(init="teacher", tasks=["gender", "expression"])
    teacher = build_model(cfg, weights="none")
    save_model(teacher, str(tmp_path / "teacher"))
    net = student.initial_network(cfg, str(tmp_path / "teacher"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), teacher.state_dict().values(), strict=True))
    with pytest.raises(UserError, match="needs the teacher model folder"):
        student.initial_network(cfg, None)
    with pytest.raises(UserError, match="differ from the configured tasks"):
        student.initial_network(cfg.model_copy(update={"tasks": ["gender"]}), str(tmp_path / "teacher"))
    result = student.run(
        cfg.model_copy(update={"tasks": ["expression"], "init": "scratch"}),
        tiny_tables["faces"],
        tiny_tables["labels"],
        pseudo_uri,
        str(tmp_path / "single"),
    )
    assert result["role"] == "student_single:expression"
