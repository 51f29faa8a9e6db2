"""What a new user meets first (issue 16): every command, bad arguments and ordinary mistakes give one line and a
documented exit code, never a traceback or a silent wrong result."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import run_cli, trusted_ingest_config
from generated import layouts
from generated.tables import make_tiny_tables

from d2mtl import cli, contracts, layout, plots, predict, store
from d2mtl.config import ConfigError, TrainConfig, load_experiment, updated
from d2mtl.config.ingest import UTKFaceSpec
from d2mtl.data import FaceIndex
from d2mtl.errors import UserError
from d2mtl.stages import evaluate, ingest, ingest_report
from d2mtl_pipeline import cli as command_line


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err


# ---- task lists ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", ["ages", "age,ages", ","])
def test_teacher_tasks_are_validated_as_the_config_is(tasks, tiny_tables, tmp_path, capsys):
    code, err = run_cli(
        [
            "teacher",
            "--set",
            "teacher.model.weights=none",
            "--faces",
            tiny_tables["faces"],
            "--labels",
            tiny_tables["labels"],
            "--out",
            str(tmp_path / "t"),
            "--tasks",
            tasks,
        ],
        capsys,
    )
    one_line_error(code, err, "d2mtl teacher: error: --tasks: ")
    assert (
        "unknown task(s) ages; known tasks: age, gender, race, expression" in err
        if "ages" in tasks
        else "empty task list" in err
    )
    assert not (tmp_path / "t").exists()


def test_pseudolabel_tasks_name_the_unknown_task(tiny_tables, tmp_path, capsys):
    code, err = run_cli(
        [
            "pseudolabel",
            "--teacher",
            str(tmp_path / "teacher"),
            "--faces",
            tiny_tables["faces"],
            "--labels",
            tiny_tables["labels"],
            "--out",
            str(tmp_path / "p"),
            "--tasks",
            "age,gendr",
        ],
        capsys,
    )
    one_line_error(code, err, "unknown task(s) gendr")


def test_updated_config_sections_are_validated():
    assert updated(TrainConfig(), "--tasks", tasks=["race", "age"]).task_names == ("age", "race")
    with pytest.raises(ConfigError, match=r"^task: tasks: unknown task\(s\) ages"):
        updated(TrainConfig(), "task", tasks=["ages"])


# ---- --set and --config --------------------------------------------------------------------------------


def test_set_reaches_one_dataset_by_its_index(tmp_path):
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(
        "ingest:\n  datasets:\n    - {format: utkface, name: utkface, path: utkface}\n"
        "    - {format: fer2013_folder, name: fer2013, path: fer2013}\n"
    )
    cfg = load_experiment(str(experiment), ["ingest.datasets.1.limit=5"])
    assert [spec.limit for spec in cfg.ingest.datasets] == [None, 5]
    with pytest.raises(ConfigError, match=r"--set ingest.datasets.7.limit: 7 is not an index of a list of 2"):
        load_experiment(str(experiment), ["ingest.datasets.7.limit=5"])


def test_an_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"cannot read config cpuu: .*packaged profile: cpu, gpu"):
        load_experiment("cpuu")


# ---- path mistakes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["predict", "--model", "{model}/model.safetensors", "{tmp}/face.jpg"],
            "{model}/model.safetensors is a file; expected a model folder "
            "(holding model_card.json and model.safetensors): {model}",
        ),
        (
            ["export", "--model", "{model}/model.safetensors", "--format", "onnx", "--out", "{tmp}/export"],
            "{model}/model.safetensors is a file; expected a model folder",
        ),
        (
            [
                "evaluate",
                "--models",
                "{model}/model.safetensors",
                "--faces",
                "{faces}",
                "--labels",
                "{labels}",
                "--out",
                "{tmp}/evaluate",
            ],
            "{model}/model.safetensors is a file; expected a model folder",
        ),
        (
            [
                "pseudolabel",
                "--teacher",
                "{model}/model.safetensors",
                "--faces",
                "{faces}",
                "--labels",
                "{labels}",
                "--out",
                "{tmp}/pseudo",
            ],
            "{model}/model.safetensors is a file; expected a model folder",
        ),
        (
            ["teacher", "--faces", "{labels}", "--labels", "{labels}", "--out", "{tmp}/teacher"],
            "{labels} is a file; expected a face table folder",
        ),
        (["ingest", "--out", "{labels}"], "--out {labels}: {labels} is a file; expected a folder"),
        (
            ["teacher", "--faces", "{faces}", "--labels", "{labels}", "--out", "{labels}/teacher"],
            "--out {labels}/teacher: {labels} is a file; expected a folder",
        ),
        (
            ["evaluate", "--models", "{model}", "--faces", "{faces}", "--labels", "{labels}", "--out", "{labels}"],
            "--out {labels}: {labels} is a file; expected a folder",
        ),
        (
            ["export", "--model", "{model}", "--format", "onnx", "--out", "{labels}"],
            "--out {labels}: {labels} is a file; expected a folder",
        ),
        (["compile", "--out", "{labels}/pipeline.yaml"], "cannot write {labels}/pipeline.yaml: {labels} is a file"),
    ],
    ids=[
        "predict-model-file",
        "export-model-file",
        "evaluate-models-file",
        "pseudolabel-teacher-file",
        "teacher-faces-file",
        "ingest-out-file",
        "teacher-out-below-file",
        "evaluate-out-file",
        "export-out-file",
        "compile-out-below-file",
    ],
)
def test_path_mistakes_are_one_line_naming_the_path(argv, expected, tiny_tables, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    paths = {"model": str(model), "tmp": str(tmp_path), **tiny_tables}
    code, err = run_cli([arg.format(**paths) for arg in argv], capsys)
    one_line_error(code, err, expected.format(**paths))


def test_compile_creates_the_folder_or_writes_to_object_storage(s3_env, tmp_path, capsys):
    out = tmp_path / "missing" / "pipeline.yaml"
    assert command_line.main(["compile", "--out", str(out)]) == 0
    assert out.read_text().startswith("# PIPELINE DEFINITION")
    assert command_line.main(["compile", "--out", "s3://bucket/compiled/pipeline.yaml"]) == 0
    assert store.read_text("s3://bucket/compiled/pipeline.yaml") == out.read_text()
    assert f"wrote {out}" in capsys.readouterr().out


# ---- training on other inputs ---------------------------------------------------------------------------

TINY_TRAINING = [
    "--set",
    "teacher.model.weights=none",
    "--set",
    "teacher.model.input_size=32",
    "--set",
    "teacher.batch_size=8",
    "--set",
    "teacher.epochs=1",
    "--set",
    "teacher.num_workers=0",
    "--set",
    "teacher.progress=false",
    "--set",
    "teacher.threads=1",
    "--set",
    "teacher.lr.schedule=fixed",
    "--set",
    "teacher.epoch_samples=null",
]  # each train face once, not the profile's 40k


def test_new_data_into_an_old_out_is_refused_until_restart(tiny_tables, tmp_path, capsys):
    out = str(tmp_path / "teacher")
    teacher = ["teacher", *TINY_TRAINING, "--out", out]
    assert run_cli([*teacher, "--faces", tiny_tables["faces"], "--labels", tiny_tables["labels"]], capsys)[0] == 0
    first = json.loads(Path(out, layout.MODEL_CARD).read_text())["training"]["inputs"]
    assert first == {name: contracts.content_hash(tiny_tables[name]) for name in ("faces", "labels")}

    other = make_tiny_tables(tmp_path / "other", per_dataset=12, seed=1)
    code, err = run_cli([*teacher, "--faces", other["faces"], "--labels", other["labels"]], capsys)
    one_line_error(
        code,
        err,
        f"{out} holds a checkpoint of a run on other inputs (faces, labels differ). Use another "
        "--out, or --restart to train from the start",
    )
    assert json.loads(Path(out, layout.MODEL_CARD).read_text())["training"]["inputs"] == first  # the old model kept

    assert run_cli([*teacher, "--faces", other["faces"], "--labels", other["labels"], "--restart"], capsys)[0] == 0
    card = json.loads(Path(out, layout.MODEL_CARD).read_text())
    assert card["training"]["inputs"]["faces"] == contracts.content_hash(other["faces"]) != first["faces"]
    assert card["training"]["data"]["train"]["utk"]["rows"] == 10  # 12 per dataset: 6 of the first 8, then 4


# ---- tables that do not belong together -----------------------------------------------------------------


def test_student_refuses_pseudo_labels_of_another_face_table(tiny_tables, tmp_path, capsys):
    other = make_tiny_tables(tmp_path / "other", per_dataset=5, seed=1)
    pseudo = pa.Table.from_pylist(
        contracts.read_face_columns(other["faces"], ["sample_id", "dataset"]).to_pylist(),
        schema=contracts.PSEUDO_SCHEMA,
    )
    contracts.write_table(pseudo, str(tmp_path / "pseudo.parquet"), contracts.PSEUDO)
    code, err = run_cli(
        [
            "student",
            *[arg.replace("teacher.", "student.") for arg in TINY_TRAINING],
            "--faces",
            tiny_tables["faces"],
            "--labels",
            tiny_tables["labels"],
            "--pseudo",
            str(tmp_path / "pseudo.parquet"),
            "--out",
            str(tmp_path / "student"),
        ],
        capsys,
    )
    one_line_error(
        code,
        err,
        f"pseudo table {tmp_path / 'pseudo.parquet'} does not fit the face table "
        f"{tiny_tables['faces']}: 38 of 48 faces have no row in it and 0 of its 10 rows name no "
        "face (tables of different ingests?)",
    )


def test_labels_of_another_ingest_are_one_warning_with_counts(tiny_tables, tmp_path, caplog):
    labels = contracts.read_table(tiny_tables["labels"], contracts.LABELS)
    partial = str(tmp_path / "labels.parquet")
    contracts.write_table(labels.slice(0, 14), partial, contracts.LABELS)
    index = FaceIndex.load(tiny_tables["faces"], partial, ("age", "expression"))
    assert index.label_mismatch == (
        f"label table {partial} does not fit the face table {tiny_tables['faces']}: 34 "
        "of 48 faces have no row in it and 0 of its 14 rows name no face (tables of "
        "different ingests?)"
    )
    with caplog.at_level(logging.WARNING, logger="d2mtl.stages.evaluate"):
        evaluate.check_labels_fit(tiny_tables["faces"], partial, contracts.read_table(partial, contracts.LABELS))
    assert [record.getMessage() for record in caplog.records] == [
        f"{index.label_mismatch}; only the 14 faces with a label row are scored"
    ]
    renamed = labels.set_column(0, "sample_id", pa.array([f"other-{sid}" for sid in labels.column("sample_id")]))
    with pytest.raises(UserError, match="48 of 48 faces have no row in it and 48 of its 48 rows name no face"):
        evaluate.check_labels_fit(tiny_tables["faces"], "other.parquet", renamed)


# ---- progress and logs ----------------------------------------------------------------------------------


def test_the_ingest_bar_ends_at_its_total_and_age_bins_sort_by_age(tmp_path, capsys):
    layouts.utkface(tmp_path)
    ingest.run(trusted_ingest_config(tmp_path, [UTKFaceSpec()]), str(tmp_path / "out"))
    assert "| 7/7 " in capsys.readouterr().err  # it was left one short, at 6/7
    assert sorted(["100+", "20-29", "0-9", "10-19"], key=ingest_report.class_order) == ["0-9", "10-19", "20-29", "100+"]
    assert sorted(["sad", "angry"], key=ingest_report.class_order) == ["angry", "sad"]


def test_curves_of_a_one_step_age_only_run_draw_without_warnings():
    history = [{"epoch": 1, "train": {"age": 4.0}, "val": {"age_loss": 4.2, "age_mae": 9.0}}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib: "No artists with labels found to put in legend"
        assert plots.training_curves(history, [1e-3])[:4] == b"\x89PNG"


def test_an_interrupt_is_reported_on_its_own_line(monkeypatch, capsys):
    def interrupted(args):
        print("teacher epoch 1:  40%|####      | 2/5", end="", file=sys.stderr)  # a progress bar's unfinished line
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_upload_data", interrupted)
    code, err = run_cli(["upload-data", "--dest", "s3://bucket/data"], capsys)
    assert code == 130 and err.splitlines()[-1] == "d2mtl upload-data: interrupted"


# ---- help ----------------------------------------------------------------------------------------------


def test_help_is_plain_text_with_examples_and_a_version(capsys):
    parser = command_line.build_parser()
    top = parser.format_help()
    assert "``" not in top and "::" not in top and "Exit codes: 0 done; 2 " in top
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        text = command.format_help()
        assert "examples:\n" in text and f"  d2mtl {name}" in text, name
        assert ("--data-root" in text) == (name in ("ingest", "upload-data", "run", "compile", "submit")), name
        assert all(action.help for action in command._actions), name
    predict_options = {action.dest: action for action in commands["predict"]._actions}
    assert "--set ingest.detector.min_score=0.8" in predict_options["overrides"].help
    predict_help = commands["predict"].format_help()
    for code in (predict.EXIT_NO_FACE, predict.EXIT_BAD_INPUT, predict.EXIT_NO_FACE_BAD_INPUT):
        assert f"\n  {code}  " in predict_help
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("d2mtl ")
