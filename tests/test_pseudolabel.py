"""The pseudo-label stage end to end on tiny generated tables with tiny untrained teachers."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from d2mtl import contracts, data, layout, models, store
from d2mtl.cli import main
from d2mtl.config.pseudolabel import PseudoLabelConfig
from d2mtl.config.train import ModelConfig
from d2mtl.errors import UserError
from d2mtl.stages import pseudolabel

ALL_TASKS = ("age", "gender", "race", "expression")


def _teacher(out: str, tasks=ALL_TASKS, seed: int = 0, input_size: int = 32, **card) -> str:
    torch.manual_seed(seed)
    net = models.MultiTaskNet(models.ModelSpec.from_config(ModelConfig(input_size=input_size), tasks), weights="none")
    models.save_model(net.eval(), out, role="teacher", **card)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches gain nothing from threads, and on a busy machine two threads run many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tables(tmp_path):
    from generated.tables import make_tiny_tables

    return make_tiny_tables(tmp_path / "ingest", per_dataset=20)  # 40 faces in 4 face shards of 10


def _config(**overrides) -> PseudoLabelConfig:
    rules = {
        "gender": {"rule": "fixed", "threshold": 0.5},
        "race": {"rule": "prior", "retention": 0.5},
        "expression": {"rule": "fixed", "threshold": 0.0},
        "age": {"rule": "spread", "max_spread": 100.0},
    }
    return PseudoLabelConfig(
        **{
            "transforms": ["identity", "hflip", "crop:0.8", "scale:1.25"],
            "batch_size": 8,
            "workers": 0,
            "device": "cpu",
            "rules": rules,
            **overrides,
        }
    )


def _read(out: str) -> pa.Table:
    return contracts.read_table(store.join(out, layout.PSEUDO_FILE), contracts.PSEUDO)


def _labels(tables) -> dict[str, dict]:
    return {row["sample_id"]: row for row in contracts.read_table(tables["labels"], contracts.LABELS).to_pylist()}


def test_ground_truth_is_never_overwritten_and_gaps_are_filled(tables, tmp_path):
    teacher = _teacher(str(tmp_path / "teacher"))
    result = pseudolabel.run(_config(), [teacher], tables["faces"], tables["labels"], str(tmp_path / "out"))
    pseudo = _read(str(tmp_path / "out"))
    assert pseudo.num_rows == 40 and result["rows"] == 40
    assert pseudo.column("sample_id").to_pylist() == sorted(pseudo.column("sample_id").to_pylist())
    labels = _labels(tables)
    for row in pseudo.to_pylist():
        truth = labels[row["sample_id"]]
        for task in ALL_TASKS:
            assert row[task] is not None  # the teacher's prediction is stored for every face
            if truth[task] is not None:
                assert row[f"{task}_kept"] is False
        assert row["dataset"] == row["sample_id"].split("-")[0]
    by_dataset = {d: pseudo.filter(pc.equal(pseudo.column("dataset"), d)) for d in ("utk", "fer")}
    assert by_dataset["fer"].column("expression_kept").to_pylist() == [False] * 20
    assert all(by_dataset["fer"].column("age_kept").to_pylist())  # spread bound 100 keeps every candidate
    probs = np.array(pseudo.column("race_probs").to_pylist())
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs.max(axis=1), pseudo.column("race_confidence").to_numpy(), rtol=1e-6)

    meta = json.loads(contracts.table_metadata(result["pseudo"])[contracts.PSEUDO_PROVENANCE_KEY])
    assert meta["transforms"] == ["identity", "hflip", "crop:0.8", "scale:1.25"]
    assert meta["teachers"][0]["uri"] == teacher and len(meta["teachers"][0]["weights_sha256"]) == 64
    report = json.loads(store.read_text(result["report"]))
    assert report["selection"]["expression"] == {**report["selection"]["expression"], "labelled": 20, "candidates": 20}
    race_rows = [r for r in report["retention"] if r["task"] == "race" and r["dataset"] == "fer"]
    quota = report["selection"]["race"]["thresholds"]["quota"]  # prior rule: retention 0.5 of 20 split by the prior
    assert sum(quota.values()) == 10 and race_rows[0]["class"] == "all"
    assert sum(r["candidates"] for r in race_rows[1:]) == 20
    for row in race_rows[1:]:
        assert row["kept"] == min(row["candidates"], quota[row["class"]])


def test_shards_merged_equal_one_pass_and_output_is_deterministic(tables, tmp_path):
    teacher = _teacher(str(tmp_path / "teacher"))
    cfg = _config()
    whole = str(tmp_path / "whole")
    pseudolabel.run(cfg, [teacher], tables["faces"], tables["labels"], whole)
    shard_outs = [str(tmp_path / f"shard{i}") for i in range(3)]
    decoding_workers = cfg.model_copy(update={"workers": 2})  # they split a shard's face shards between them
    for i, out in enumerate(shard_outs):
        result = pseudolabel.run(decoding_workers, [teacher], tables["faces"], tables["labels"], out, shard=(i, 3))
        assert result["rows"] == (20 if i == 0 else 10)  # face shards 0 and 3 go to shard 0
    merged = str(tmp_path / "merged")
    pseudolabel.merge(cfg, list(reversed(shard_outs)), merged)
    assert _read(merged).equals(_read(whole))
    assert contracts.table_metadata(store.join(merged, layout.PSEUDO_FILE)) == contracts.table_metadata(
        store.join(whole, layout.PSEUDO_FILE)
    )
    whole_report = json.loads(store.read_text(store.join(whole, layout.PSEUDO_REPORT)))
    merged_report = json.loads(store.read_text(store.join(merged, layout.PSEUDO_REPORT)))
    assert {**merged_report, "shards": 1} == whole_report

    again = str(tmp_path / "again")
    pseudolabel.run(cfg, [teacher], tables["faces"], tables["labels"], again)
    assert store.read_bytes(store.join(again, layout.PSEUDO_FILE)) == store.read_bytes(
        store.join(whole, layout.PSEUDO_FILE)
    )


def test_more_shards_than_face_shards_leaves_empty_parts(tables, tmp_path):
    teacher = _teacher(str(tmp_path / "teacher"))
    cfg = _config(transforms=["identity"])
    pseudolabel.run(cfg, [teacher], tables["faces"], tables["labels"], str(tmp_path / "whole"))
    outs = [str(tmp_path / f"shard{i}") for i in range(5)]
    rows = [
        pseudolabel.run(cfg, [teacher], tables["faces"], tables["labels"], out, shard=(i, 5))["rows"]
        for i, out in enumerate(outs)
    ]
    assert rows == [10, 10, 10, 10, 0]
    pseudolabel.merge(cfg, outs, str(tmp_path / "merged"))
    assert _read(str(tmp_path / "merged")).equals(_read(str(tmp_path / "whole")))


def test_merge_refuses_missing_and_foreign_shards(tables, tmp_path):
    teacher = _teacher(str(tmp_path / "teacher"))
    cfg = _config()
    outs = [str(tmp_path / f"shard{i}") for i in range(2)]
    for i, out in enumerate(outs):
        pseudolabel.run(cfg, [teacher], tables["faces"], tables["labels"], out, shard=(i, 2))
    with pytest.raises(UserError, match="missing shard"):
        pseudolabel.merge(cfg, outs[:1], str(tmp_path / "merged"))
    other = str(tmp_path / "other")
    pseudolabel.run(_config(transforms=["identity"]), [teacher], tables["faces"], tables["labels"], other, shard=(1, 2))
    with pytest.raises(UserError, match="differs in transforms"):
        pseudolabel.merge(cfg, [outs[0], other], str(tmp_path / "merged"))
    with pytest.raises(UserError, match="given twice"):
        pseudolabel.merge(cfg, [outs[0], outs[0]], str(tmp_path / "merged"))


def test_teacher_with_other_tasks_is_a_clear_error(tables, tmp_path):
    age_teacher = _teacher(str(tmp_path / "age"), tasks=("age",))
    with pytest.raises(UserError, match=r"predicts age but pseudolabel.tasks is age, gender, race, expression"):
        pseudolabel.run(_config(), [age_teacher], tables["faces"], tables["labels"], str(tmp_path / "out"))
    full = _teacher(str(tmp_path / "full"))
    with pytest.raises(UserError, match=r"predicts age, gender, race, expression but pseudolabel\.tasks is age"):
        pseudolabel.run(
            _config(tasks=["age"]), [age_teacher, full], tables["faces"], tables["labels"], str(tmp_path / "out")
        )


def test_single_task_ensemble_fills_only_its_task(tables, tmp_path):
    teachers = [
        _teacher(str(tmp_path / f"age{seed}"), tasks=("age",), seed=seed, input_size=size)
        for seed, size in ((0, 32), (1, 40))
    ]  # each teacher gets its own input size
    cfg = _config(tasks=["age"], transforms=["identity"])
    pseudolabel.run(cfg, teachers, tables["faces"], tables["labels"], str(tmp_path / "out"))
    pseudo = _read(str(tmp_path / "out"))
    assert pseudo.column("gender").null_count == 40 and not any(pseudo.column("gender_kept").to_pylist())
    spread = pseudo.column("age_spread").to_numpy()
    assert (spread > 0).all()  # two different teachers disagree; one transform alone would give 0
    faces = {r["sample_id"]: r["image"] for b in contracts.iter_face_batches(tables["faces"]) for r in b.to_pylist()}
    first = pseudo.column("sample_id")[0].as_py()
    ages = [models.load_model(t)[0].predict(model_input(t, faces[first]))["age"].item() for t in teachers]
    assert pseudo.column("age")[0].as_py() == pytest.approx(np.mean(ages), rel=1e-5)
    assert spread[0] == pytest.approx(np.std(ages), abs=1e-3)


def model_input(teacher: str, jpeg: bytes) -> torch.Tensor:
    card = contracts.read_model_card(teacher)
    return data.preprocess([jpeg], card.input_size, card.mean, card.std)


def test_views_are_batched_and_grouped_by_size(tmp_path):
    teacher = pseudolabel.Teacher("t", *models.load_model(_teacher(str(tmp_path / "t"))))
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    members = pseudolabel.predict_members([teacher], images, ["identity", "hflip", "scale:1.5"], torch.device("cpu"))
    assert members["gender"].shape == (3, 5, 2) and members["age"].shape == (3, 5)
    x = data.normalize(data.eval_transform(32)(images), teacher.card.mean, teacher.card.std)
    np.testing.assert_allclose(members["race"][1], teacher.net.predict(x.flip(-1))["race"].numpy(), atol=1e-5)
    scaled, flipped_crop, crop = pseudolabel.make_views(x, ["scale:1.5", "hflip+crop:0.5", "crop:0.5"])
    assert scaled.shape[-1] == 48 and flipped_crop.shape == x.shape
    torch.testing.assert_close(flipped_crop, crop.flip(-1))  # a centre crop commutes with the flip


def test_holdout_mode_reports_quality_against_hidden_labels(tables, tmp_path):
    cfg = _config(holdout={"fraction": 0.25, "tasks": ["age", "expression"], "thresholds": [0.0, 0.2, 0.5]})
    hidden = pseudolabel.write_holdout_labels(cfg, tables["faces"], tables["labels"], str(tmp_path / "holdout"))
    assert hidden["hidden"] == {"age": 5, "expression": 5}
    train = contracts.read_table(hidden["labels"], contracts.LABELS)
    assert train.column("expression").null_count == 20 + 5
    cheat = _teacher(str(tmp_path / "cheat"), sources={"faces": tables["faces"], "labels": tables["labels"]})
    with pytest.raises(UserError, match="does not hide these labels"):
        pseudolabel.run(cfg, [cheat], tables["faces"], tables["labels"], str(tmp_path / "out"))
    teacher = _teacher(str(tmp_path / "teacher"), sources={"faces": tables["faces"], "labels": hidden["labels"]})
    result = pseudolabel.run(cfg, [teacher], tables["faces"], tables["labels"], str(tmp_path / "out"))
    report = json.loads(store.read_text(result["report"]))
    curves = report["holdout"]["curves"]
    assert set(curves) == {"age", "expression"}
    expression = curves["expression"]
    assert expression["rule"] == "fixed" and expression["parameter"] == "threshold"
    assert [p["threshold"] for p in expression["curve"]] == [0.0, 0.2, 0.5]
    assert expression["curve"][0]["kept"] == 5  # threshold 0 keeps every hidden row
    assert expression["chosen"]["hidden"] == 5 and expression["chosen"]["kept"] == 5
    assert expression["other_rules"]["prior"]["parameter"] == "retention_target"
    assert len(expression["other_rules"]["prior"]["curve"]) == 10
    assert curves["age"]["parameter"] == "max_spread" and curves["age"]["other_rules"] == {}
    assert curves["age"]["chosen"]["mae"] >= 0
    assert store.exists(store.join(str(tmp_path / "out"), layout.PSEUDO_HOLDOUT_PLOT))
    pseudo = _read(str(tmp_path / "out"))
    truth = contracts.read_table(hidden["hidden_truth"], contracts.LABELS)
    hidden_ids = {r["sample_id"] for r in truth.to_pylist() if r["expression"] is not None}
    kept_ids = {r["sample_id"] for r in pseudo.to_pylist() if r["expression_kept"]}
    assert hidden_ids <= kept_ids  # threshold 0 keeps every hidden row: it is a candidate now
    assert report["selection"]["expression"]["labelled"] == 15


def test_cli_runs_shards_merges_and_reports_errors_in_one_line(tables, tmp_path, capsys):
    teacher = _teacher(str(tmp_path / "teacher"))
    common = [
        "--set",
        "pseudolabel.transforms=[identity]",
        "--set",
        "pseudolabel.device=cpu",
        "--set",
        "pseudolabel.threads=1",
    ]
    for i in range(2):
        assert (
            main(
                [
                    "pseudolabel",
                    *common,
                    "--teacher",
                    teacher,
                    "--faces",
                    tables["faces"],
                    "--labels",
                    tables["labels"],
                    "--out",
                    str(tmp_path / f"s{i}"),
                    "--shard",
                    f"{i}/2",
                ]
            )
            == 0
        )
    assert (
        main(
            [
                "pseudolabel",
                *common,
                "--merge",
                str(tmp_path / "s0"),
                str(tmp_path / "s1"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    assert _read(str(tmp_path / "merged")).num_rows == 40
    assert (
        main(
            [
                "pseudolabel",
                *common,
                "--tasks",
                "age",
                "--teacher",
                teacher,
                "--faces",
                tables["faces"],
                "--labels",
                tables["labels"],
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: the shard runs' progress bars
    assert err.startswith("d2mtl pseudolabel: error: teacher") and "--tasks age,gender,race,expression" in err


def test_everything_on_s3(tables, tmp_path, s3_env):
    for path in store.list_files(tables["faces"]):
        store.upload_file(path, f"s3://bucket/pl/faces/{path.rsplit('/', 1)[-1]}")
    store.upload_file(tables["labels"], "s3://bucket/pl/labels.parquet")
    teacher = _teacher("s3://bucket/pl/teacher")
    cfg = _config(transforms=["identity"], workers=1)  # the decoding process reads the face shards from S3
    outs = [f"s3://bucket/pl/shard{i}" for i in range(2)]
    for i, out in enumerate(outs):
        pseudolabel.run(cfg, [teacher], "s3://bucket/pl/faces", "s3://bucket/pl/labels.parquet", out, shard=(i, 2))
    result = pseudolabel.merge(cfg, outs, "s3://bucket/pl/merged")
    assert result["rows"] == 40 and contracts.read_table(result["pseudo"], contracts.PSEUDO).num_rows == 40
