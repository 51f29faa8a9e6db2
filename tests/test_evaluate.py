import json
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from conftest import training_record
from generated.tables import make_tiny_tables

from d2mtl import contracts, data, layout, models, store
from d2mtl.config import EvaluateConfig
from d2mtl.config.train import ModelConfig
from d2mtl.errors import UserError
from d2mtl.roles import Role
from d2mtl.stages import evaluate

ALL_TASKS = ("age", "gender", "race", "expression")


def _tiny_model(out: str, tasks: tuple[str, ...], seed: int, **card) -> str:
    """An untrained 32 px network whose BatchNorm statistics come from one random batch, so that (unlike a
    freshly initialised one) its predictions vary with the input."""
    torch.manual_seed(seed)
    net = models.MultiTaskNet(models.ModelSpec.from_config(ModelConfig(input_size=32), tasks), weights="none")
    with torch.no_grad():
        net.train()(torch.randn(16, 3, 32, 32) * 2)
    models.save_model(net.eval(), out, **card)
    return out


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return make_tiny_tables(tmp_path_factory.mktemp("ingest"))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "teacher": _tiny_model(str(root / "teacher"), ALL_TASKS, 0),
        "baseline_age": _tiny_model(str(root / "baselines" / "age"), ("age",), 1),
        "student": _tiny_model(str(root / "student"), ALL_TASKS, 2),
    }


def _cfg(**extra) -> EvaluateConfig:
    views = [{"name": "gray", "datasets": ["utk"], "grayscale": True, "downscale_to": 12}]
    return EvaluateConfig(**{"fairness_min_group": 1, "views": views, **extra})


def _direct_age_mae(model_dir: str, faces: str, labels: str, dataset: str, split: str) -> float:
    """The MAE computed without the stage: load the model, preprocess the faces, join the labels by hand."""
    net, card = models.load_model(model_dir)
    table = pa.Table.from_batches(list(contracts.iter_face_batches(faces)))
    table = table.filter(pc.and_(pc.equal(table["dataset"], dataset), pc.equal(table["split"], split)))
    ages = {row["sample_id"]: row["age"] for row in contracts.read_table(labels, contracts.LABELS).to_pylist()}
    predicted = net.predict(data.preprocess(table["image"].to_pylist(), card.input_size, card.mean, card.std))[
        "age"
    ].numpy()
    truth = np.array([ages[s] for s in table["sample_id"].to_pylist()])
    return float(np.abs(predicted - truth).mean())


def test_evaluate_end_to_end(tables, model_dirs, tmp_path):
    out = str(tmp_path / "eval")
    items = [model_dirs["teacher"], model_dirs["baseline_age"], f"student={model_dirs['student']}"]
    summary = evaluate.run(_cfg(), items, tables["faces"], tables["labels"], out)

    assert summary["models"] == ["teacher", "baselines_age", "student"]
    assert {(f["dataset"], f["faces"]) for f in summary["faces"]} == {("utk", 3), ("fer", 3), ("utk~gray", 3)}
    scalars = json.loads(store.read_text(store.join(out, layout.EVAL_METRICS)))
    assert scalars == summary["metrics"] and all(isinstance(v, float) for v in scalars.values())
    assert scalars["teacher/age/utk/test/mae"] == pytest.approx(
        _direct_age_mae(model_dirs["teacher"], **tables, dataset="utk", split="test"), rel=1e-5
    )
    assert "teacher/expression/fer/test/macro_f1" in scalars
    assert not any(k.startswith("baselines_age/") and "/age/" not in k for k in scalars)  # only its own task

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


def test_roles_from_config_and_name_clashes(model_dirs):
    cfg = _cfg(roles={"a": "teacher", "b": "student"})
    loaded = evaluate.load_models(
        [f"a={model_dirs['teacher']}", f"b={model_dirs['student']}"], cfg, torch.device("cpu")
    )
    assert [m.role for m in loaded] == [Role("teacher"), Role("student")]
    with pytest.raises(UserError, match="two models are named 'teacher'"):
        evaluate.load_models([model_dirs["teacher"], f"teacher={model_dirs['student']}"], _cfg(), torch.device("cpu"))
    with pytest.raises(UserError, match=r"evaluate\.roles names model"):
        evaluate.load_models([model_dirs["teacher"]], _cfg(roles={"ghost": "student"}), torch.device("cpu"))
    with pytest.raises(UserError, match="both have role teacher"):
        evaluate.load_models(
            [model_dirs["teacher"], f"x={model_dirs['student']}"], _cfg(roles={"x": "teacher"}), torch.device("cpu")
        )


def test_split_model_arg():
    assert evaluate.split_model_arg("teacher=s3://b/run/teacher") == ("teacher", "s3://b/run/teacher")
    assert evaluate.split_model_arg("s3://b/run/x=1") == (None, "s3://b/run/x=1")
    assert evaluate.split_model_arg("runs/teacher") == (None, "runs/teacher")


def test_coverage_from_ground_truth_cards_not_students(tables, tmp_path):
    data = {
        "train": {"utk": {"rows": 10, "age": 10, "gender": 10}, "fer": {"rows": 5, "age": 0}},
        "val": {},
        "test": {},
    }
    train = training_record(data={**data, "unmatched_labels": 0})
    student_data = {"train": {"fer": {"rows": 5, "age": 5}}, "val": {}, "test": {}, "unmatched_labels": 0}
    student_train = training_record(data=student_data)  # pseudo-labels: not ground truth
    teacher = _tiny_model(str(tmp_path / "teacher"), ("age", "gender"), 0, role="teacher", training=train)
    student = _tiny_model(str(tmp_path / "student"), ("age", "gender"), 0, role="student", training=student_train)
    loaded = evaluate.load_models([teacher, student], _cfg(), torch.device("cpu"))
    labels = contracts.read_table(tables["labels"], contracts.LABELS)
    coverage, source = evaluate.in_domain_coverage(_cfg(), loaded, tables["faces"], labels)
    assert coverage["age"] == {"utk"} and coverage["expression"] == set() and source == "model cards of teacher"
    coverage, source = evaluate.in_domain_coverage(_cfg(in_domain={"age": ["fer"]}), loaded, tables["faces"], labels)
    assert coverage["age"] == {"fer"} and coverage["gender"] == set() and source.startswith("config")


def _copy_faces(source: str, target: str, change) -> str:
    """A copy of a face table with ``change(row)`` applied to each row (None drops the row)."""
    writer = contracts.FaceTableWriter(target)
    for row in pa.Table.from_batches(list(contracts.iter_face_batches(source))).to_pylist():
        if (row := change(row)) is not None:
            writer.write(row)
    writer.close()
    return target


def test_undecodable_face_is_reported_not_fatal(tables, model_dirs, tmp_path):
    def corrupt(row):
        return {**row, "image": b"not a jpeg"} if row["sample_id"] == "utk-0007" else row  # a utk test face

    faces = _copy_faces(tables["faces"], str(tmp_path / "faces"), corrupt)
    out = str(tmp_path / "eval")
    summary = evaluate.run(_cfg(views=[]), [model_dirs["teacher"]], faces, tables["labels"], out)
    details = json.loads(store.read_text(store.join(out, layout.EVAL_DETAILS)))
    assert [s["sample_id"] for s in details["skipped"]] == ["utk-0007"]
    assert {(f["dataset"], f["faces"]) for f in summary["faces"]} == {("utk", 2), ("fer", 3)}


def test_sample_per_dataset_and_empty_split(tables, model_dirs, tmp_path):
    summary = evaluate.run(
        _cfg(views=[], splits=["train"], claims_split="train", max_faces_per_dataset=4),
        [model_dirs["teacher"]],
        tables["faces"],
        tables["labels"],
        str(tmp_path / "a"),
    )
    assert {(f["dataset"], f["split"], f["faces"]) for f in summary["faces"]} == {
        ("utk", "train", 4),
        ("fer", "train", 4),
    }
    faces = _copy_faces(tables["faces"], str(tmp_path / "faces"), lambda r: r if r["split"] == "train" else None)
    with pytest.raises(UserError, match="no faces in split"):
        evaluate.run(_cfg(), [model_dirs["teacher"]], faces, tables["labels"], str(tmp_path / "b"))


def test_outputs_and_models_on_s3(s3_env, tables, tmp_path):
    teacher = _tiny_model("s3://bucket/eval-test/teacher", ALL_TASKS, 0)
    out = "s3://bucket/eval-test/evaluate"
    evaluate.run(_cfg(views=[]), [teacher], tables["faces"], tables["labels"], out)
    names = {uri.rsplit("/", 1)[-1] for uri in store.list_files(out)}
    assert {layout.EVAL_METRICS, layout.EVAL_CLAIMS, layout.EVAL_DETAILS, layout.EVAL_REPORT_HTML} <= names
    assert "teacher_expression_fer_test.json" in names


def test_config_refuses_bad_roles_and_splits():
    from d2mtl.config import ConfigError, load_experiment

    with pytest.raises(ConfigError, match=r"evaluate\.roles"):
        load_experiment("cpu", ["evaluate.roles={a: baseline:height}"])
    with pytest.raises(ConfigError, match="claims_split 'test' is not among"):
        load_experiment("cpu", ["evaluate.splits=[val]"])
    assert load_experiment("gpu").evaluate.views[0].name == "gray48"


def test_role_none_scores_a_model_outside_the_claims():
    from d2mtl.config import load_experiment

    cfg = load_experiment("cpu", ["evaluate.roles={variant_a: none}"]).evaluate
    assert evaluate.role_of("variant_a", "teacher", cfg) is None
    assert str(evaluate.role_of("variant_b", "teacher", cfg)) == "teacher"


def test_view_makes_gray_low_resolution_faces_of_the_same_size():
    from d2mtl.config.evaluate import DomainView

    face = torch.zeros(3, 32, 32, dtype=torch.uint8)
    face[0, :, ::2] = 255  # fine red stripes
    viewed = evaluate.apply_view(face, DomainView(name="g", grayscale=True, downscale_to=8))
    assert viewed.shape == face.shape and viewed.dtype == torch.uint8
    assert torch.equal(viewed[0], viewed[1]) and torch.equal(viewed[1], viewed[2])
    assert viewed.float().std() < 5  # the stripes are gone: only their mean gray survives


def test_missing_inputs_are_user_errors(tables, model_dirs, tmp_path):
    with pytest.raises(UserError, match=r"label table .* not found"):
        evaluate.run(_cfg(), [model_dirs["teacher"]], tables["faces"], str(tmp_path / "none.parquet"), str(tmp_path))
    with pytest.raises(UserError, match=r"no _manifest\.json"):
        evaluate.run(_cfg(), [model_dirs["teacher"]], str(tmp_path / "none"), tables["labels"], str(tmp_path))
    with pytest.raises(UserError, match=r"pseudo-label report .* not found"):
        evaluate.run(
            _cfg(views=[]),
            [model_dirs["teacher"]],
            tables["faces"],
            tables["labels"],
            str(tmp_path / "o"),
            pseudo_reports=[str(tmp_path / "report.json")],
        )
