import json
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from d2mtl import contracts, data, layout, models, store
from d2mtl.config import EvaluateConfig
from d2mtl.errors import UserError
from d2mtl.roles import Role
from d2mtl.stages import evaluate

ALL_TASKS = ("age", "gender", "race", "expression")


def _tiny_model(out: str, tasks: tuple[str, ...], seed: int, **card) -> str:
    """An untrained 32 px network whose BatchNorm statistics come from one random batch, so that (unlike a
    freshly initialised one) its predictions vary with the input."""
    torch.manual_seed(seed)
    net = models.MultiTaskNet(models.ModelSpec(tasks=tasks, input_size=32), weights="none")
    with torch.no_grad():
        net.train()(torch.randn(16, 3, 32, 32) * 2)
    models.save_model(net.eval(), out, **card)
    return out


@pytest.fixture
def model_dirs(tmp_path):
    root = tmp_path / "models"
    return {"teacher": _tiny_model(str(root / "teacher"), ALL_TASKS, 0),
            "baseline_age": _tiny_model(str(root / "baselines" / "age"), ("age",), 1),
            "student": _tiny_model(str(root / "student"), ALL_TASKS, 2)}


def _cfg(**extra) -> EvaluateConfig:
    views = [{"name": "gray", "datasets": ["utk"], "grayscale": True, "downscale_to": 12}]
    return EvaluateConfig(**{"fairness_min_group": 1, "views": views, **extra})


def _direct_age_mae(model_dir: str, faces: str, labels: str, dataset: str, split: str) -> float:
    """The MAE computed without the stage: load the model, preprocess the faces, join the labels by hand."""
    net, card = models.load_model(model_dir)
    table = pa.Table.from_batches(list(contracts.iter_face_batches(faces)))
    table = table.filter(pc.and_(pc.equal(table["dataset"], dataset), pc.equal(table["split"], split)))
    ages = {row["sample_id"]: row["age"] for row in contracts.read_table(labels, contracts.LABELS).to_pylist()}
    predicted = net.predict(data.preprocess(table["image"].to_pylist(), card))["age"].numpy()
    truth = np.array([ages[s] for s in table["sample_id"].to_pylist()])
    return float(np.abs(predicted - truth).mean())


def test_evaluate_end_to_end(tiny_tables, model_dirs, tmp_path):
    out = str(tmp_path / "eval")
    items = [model_dirs["teacher"], model_dirs["baseline_age"], f"student={model_dirs['student']}"]
    summary = evaluate.run(_cfg(), items, tiny_tables["faces"], tiny_tables["labels"], out)

    assert summary["models"] == ["teacher", "baselines_age", "student"]
    assert {(f["dataset"], f["faces"]) for f in summary["faces"]} == {("utk", 3), ("fer", 3), ("utk~gray", 3)}
    scalars = json.loads(store.read_text(store.join(out, layout.EVAL_METRICS)))
    assert scalars == summary["metrics"] and all(isinstance(v, float) for v in scalars.values())
    assert scalars["teacher/age/utk/test/mae"] == pytest.approx(
        _direct_age_mae(model_dirs["teacher"], **tiny_tables, dataset="utk", split="test"), rel=1e-5)
    assert "teacher/expression/fer/test/macro_f1" in scalars
    assert not any(k.startswith("baselines_age/") and "/age/" not in k for k in scalars)  # only its own task
    assert scalars["teacher/age/utk~gray/test/mae"] != scalars["teacher/age/utk/test/mae"]  # the view changes faces

    details = json.loads(store.read_text(store.join(out, layout.EVAL_DETAILS)))
    roles = {m["name"]: m["role"] for m in details["models"]}
    assert roles == {"teacher": "teacher", "baselines_age": "baseline:age", "student": "student"}
    assert details["coverage"]["expression"] == ["fer"] and details["coverage_source"].startswith("train split")
    assert any(r["group_by"] == "gender" for r in details["rows"]) and details["fairness_gaps"]

    claims = json.loads(store.read_text(store.join(out, layout.EVAL_CLAIMS)))
    assert [c["claim"] for c in claims["claims"]] == [1, 2, 3]
    assert claims["claims"][2]["status"] == "not measurable"  # no single-task-distilled students
    domains = {(row[0], row[1]): row[2] for row in claims["comparison"]["rows"]}
    assert domains[("age", "utk")] == "in-domain" and domains[("age", "utk~gray")] == "cross-domain"

    confusion = json.loads(store.read_text(store.join(out, layout.CONFUSION_DIR, "teacher_race_utk_test.json")))
    assert confusion["categories"] == ["white", "black", "asian", "indian", "others"]
    assert np.array(confusion["matrix"]).shape == (5, 5) and np.array(confusion["matrix"]).sum() == 3
    assert store.read_bytes(store.join(out, layout.CONFUSION_DIR, "teacher_race_utk_test.png")).startswith(b"\x89PNG")

    images = []
    parser = HTMLParser()
    parser.handle_starttag = lambda tag, attrs: images.append(dict(attrs)["src"]) if tag == "img" else None
    parser.feed(store.read_text(store.join(out, layout.EVAL_REPORT_HTML)))
    assert len(images) == len(summary["confusion"]) and all(src.startswith("data:image/png") for src in images)


def test_roles_from_config_and_name_clashes(tiny_tables, model_dirs, tmp_path):
    cfg = _cfg(roles={"a": "teacher", "b": "student"})
    loaded = evaluate.load_models([f"a={model_dirs['teacher']}", f"b={model_dirs['student']}"], cfg,
                                  torch.device("cpu"))
    assert [m.role for m in loaded] == [Role("teacher"), Role("student")]
    with pytest.raises(UserError, match="two models are named 'teacher'"):
        evaluate.load_models([model_dirs["teacher"], f"teacher={model_dirs['student']}"], _cfg(), torch.device("cpu"))
    with pytest.raises(UserError, match="evaluate.roles names model"):
        evaluate.load_models([model_dirs["teacher"]], _cfg(roles={"ghost": "student"}), torch.device("cpu"))
    with pytest.raises(UserError, match="both have role teacher"):
        evaluate.run(_cfg(roles={"x": "teacher"}), [model_dirs["teacher"], f"x={model_dirs['student']}"],
                     tiny_tables["faces"], tiny_tables["labels"], str(tmp_path / "out"))


def test_split_model_arg():
    assert evaluate.split_model_arg("teacher=s3://b/run/teacher") == ("teacher", "s3://b/run/teacher")
    assert evaluate.split_model_arg("s3://b/run/x=1") == (None, "s3://b/run/x=1")
    assert evaluate.split_model_arg("runs/teacher") == (None, "runs/teacher")


def test_coverage_from_ground_truth_cards_not_students(tiny_tables, tmp_path):
    train = {"data": {"train": {"utk": {"rows": 10, "age": 10, "gender": 10}, "fer": {"rows": 5, "age": 0}}}}
    student_train = {"data": {"train": {"fer": {"rows": 5, "age": 5}}}}  # pseudo-labels: not ground truth
    teacher = _tiny_model(str(tmp_path / "teacher"), ("age", "gender"), 0, role="teacher", training=train)
    student = _tiny_model(str(tmp_path / "student"), ("age", "gender"), 0, role="student", training=student_train)
    loaded = evaluate.load_models([teacher, student], _cfg(), torch.device("cpu"))
    labels = contracts.read_table(tiny_tables["labels"], contracts.LABELS)
    coverage, source = evaluate.in_domain_coverage(_cfg(), loaded, tiny_tables["faces"], labels)
    assert coverage["age"] == {"utk"} and coverage["expression"] == set() and source == "model cards of teacher"
    coverage, source = evaluate.in_domain_coverage(_cfg(in_domain={"age": ["fer"]}), loaded, tiny_tables["faces"],
                                                   labels)
    assert coverage["age"] == {"fer"} and coverage["gender"] == set() and source.startswith("config")


def test_undecodable_face_is_reported_not_fatal(tiny_tables, model_dirs, tmp_path):
    faces = str(tmp_path / "faces")
    writer = contracts.FaceTableWriter(faces)
    for row in pa.Table.from_batches(list(contracts.iter_face_batches(tiny_tables["faces"]))).to_pylist():
        if row["sample_id"] == "utk-0007":  # a utk test face
            row["image"] = b"not a jpeg"
        writer.write(row)
    writer.close()
    out = str(tmp_path / "eval")
    summary = evaluate.run(_cfg(views=[]), [model_dirs["teacher"]], faces, tiny_tables["labels"], out)
    details = json.loads(store.read_text(store.join(out, layout.EVAL_DETAILS)))
    assert [s["sample_id"] for s in details["skipped"]] == ["utk-0007"]
    assert {(f["dataset"], f["faces"]) for f in summary["faces"]} == {("utk", 2), ("fer", 3)}


def test_no_faces_in_split_is_a_user_error(tiny_tables, model_dirs, tmp_path):
    cfg = EvaluateConfig(splits=["test"], max_faces_per_dataset=0)
    with pytest.raises(UserError, match="no faces in split"):
        evaluate.run(cfg, [model_dirs["teacher"]], tiny_tables["faces"], tiny_tables["labels"], str(tmp_path / "o"))


def test_outputs_and_models_on_s3(s3_env, tiny_tables, tmp_path):
    teacher = _tiny_model("s3://bucket/eval-test/teacher", ALL_TASKS, 0)
    out = "s3://bucket/eval-test/evaluate"
    evaluate.run(_cfg(views=[]), [teacher], tiny_tables["faces"], tiny_tables["labels"], out)
    names = {uri.rsplit("/", 1)[-1] for uri in store.list_files(out)}
    assert {layout.EVAL_METRICS, layout.EVAL_CLAIMS, layout.EVAL_DETAILS, layout.EVAL_REPORT_HTML} <= names
    assert "teacher_expression_fer_test.json" in names
