"""Evaluation-only datasets (``use: evaluate``): ingested with their labels, never trained on, pseudo-labelled as
an unlabelled domain whose real labels measure the pseudo-labels."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from conftest import read_ingest_report, trusted_ingest_config
from generated import layouts
from generated.tables import make_tiny_tables

from d2mtl import contracts, layout, models, store
from d2mtl.config.ingest import UTKFaceSpec
from d2mtl.config.pseudolabel import PseudoLabelConfig
from d2mtl.config.train import ModelConfig
from d2mtl.data import FaceIndex
from d2mtl.stages import ingest, pseudolabel

TASKS = ("age", "gender", "race", "expression")


@pytest.fixture
def tables(tmp_path):
    return make_tiny_tables(tmp_path / "ingest", per_dataset=20, evaluate_only=("fer",))


def test_training_targets_leave_out_evaluation_only_labels(tables):
    index = FaceIndex.load(tables["faces"], tables["labels"], TASKS)
    fer = index.dataset == "fer"
    assert fer.sum() == 20
    assert not index.targets["expression_weight"][fer].any()
    assert set(index.dataset[index.rows("train")]) == {"utk"}
    assert index.summary(np.arange(len(index)))["fer"] == {
        "rows": 20,
        "age": 0,
        "gender": 0,
        "race": 0,
        "expression": 0,
    }

    labels = contracts.read_table(tables["labels"], contracts.LABELS)
    record, truth = contracts.training_labels(tables["faces"], labels)
    assert record.num_rows == labels.num_rows
    assert record.column("expression").null_count == labels.num_rows  # only fer labels expression
    assert truth.num_rows == 20 and truth.column("expression").null_count == 0
    assert sorted(truth.column("sample_id").to_pylist()) == [f"fer-{i:04d}" for i in range(20)]


def test_pseudo_labels_fill_the_unlabelled_domain_and_are_measured_on_its_labels(tables, tmp_path):
    torch.manual_seed(0)
    teacher = str(tmp_path / "teacher")
    models.save_model(
        models.MultiTaskNet(models.ModelSpec.from_config(ModelConfig(input_size=32), TASKS), weights="none").eval(),
        teacher,
        role="teacher",
    )
    cfg = PseudoLabelConfig(
        transforms=["identity", "hflip"],
        batch_size=8,
        workers=0,
        device="cpu",
        rules={"expression": {"rule": "fixed", "threshold": 0.0}},
    )
    result = pseudolabel.run(cfg, [teacher], tables["faces"], tables["labels"], str(tmp_path / "out"))
    pseudo = contracts.read_table(result["pseudo"], contracts.PSEUDO)
    fer = pseudo.filter(pc.equal(pseudo.column("dataset"), "fer"))
    assert all(fer.column("expression_kept").to_pylist())  # candidates although their labels exist
    report = json.loads(store.read_text(result["report"]))
    assert report["evaluate_only"] == ["fer"]
    curve = report["holdout"]["curves"]["expression"]
    assert curve["chosen"]["hidden"] == 20 and curve["chosen"]["kept"] == 20
    assert list(curve["by_dataset"]) == ["fer"]
    truth = {
        r["sample_id"]: r["expression"] for r in contracts.read_table(tables["labels"], contracts.LABELS).to_pylist()
    }
    accuracy = np.mean([row["expression"] == truth[row["sample_id"]] for row in fer.to_pylist()])
    assert curve["chosen"]["accuracy"] == pytest.approx(accuracy)


def test_ingest_marks_evaluation_only_datasets(tmp_path):
    root = tmp_path / "data"
    layouts.utkface(root)
    ingest.run(trusted_ingest_config(root, [UTKFaceSpec(use="evaluate")]), str(tmp_path / "out"))
    assert contracts.evaluate_only_datasets(layout.faces(str(tmp_path / "out"))) == ["utkface"]
    report = read_ingest_report(tmp_path / "out")
    assert report["datasets"]["utkface"]["use"] == "evaluate"
    assert "Evaluation only" in store.read_text(store.join(str(tmp_path / "out"), layout.INGEST_REPORT_MD))


def test_a_target_dataset_can_have_its_own_rule(tmp_path):
    tables = make_tiny_tables(tmp_path / "ingest", per_dataset=20)
    torch.manual_seed(0)
    teacher = str(tmp_path / "teacher")
    models.save_model(
        models.MultiTaskNet(models.ModelSpec.from_config(ModelConfig(input_size=32), TASKS), weights="none").eval(),
        teacher,
        role="teacher",
    )
    rules = {"gender": {"rule": "fixed", "threshold": 0.0}}
    cfg = PseudoLabelConfig(
        transforms=["identity"],
        batch_size=8,
        workers=0,
        device="cpu",
        rules=rules,
        dataset_rules={"fer": {"gender": {"rule": "fixed", "threshold": 1.0}}},
    )
    result = pseudolabel.run(cfg, [teacher], tables["faces"], tables["labels"], str(tmp_path / "out"))
    pseudo = contracts.read_table(result["pseudo"], contracts.PSEUDO)
    kept = {
        d: pseudo.filter(pc.equal(pseudo.column("dataset"), d)).column("gender_kept").to_pylist()
        for d in ("utk", "fer")
    }
    assert kept["fer"] == [False] * 20  # its own rule: nothing is that confident
    report = json.loads(store.read_text(result["report"]))
    assert report["selection"]["gender"]["thresholds"]["by_dataset"] == {"fer": {"rule": "fixed", "threshold": 1.0}}
    assert report["dataset_rules"] == {"fer": {"gender": {"rule": "fixed", "threshold": 1.0}}}
    with pytest.raises(ValueError, match=r"dataset_rules\.fer\.age: rule 'fixed' does not fit"):
        PseudoLabelConfig(dataset_rules={"fer": {"age": {"rule": "fixed"}}})
