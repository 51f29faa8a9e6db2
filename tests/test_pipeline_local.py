"""The whole pipeline through kfp.local on a tiny generated dataset: a run, a cached run, ``--rerun``, publishing
(to a folder and, for the publish step, to S3 through rclone), ``--from-run`` imports, and a failing stage.

Tiny on purpose (48 faces of 32 px, weights none, one epoch): the time goes to the tasks' process start-up."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from generated import layouts

from d2mtl import contracts, layout, store
from d2mtl.config import load_experiment
from d2mtl_pipeline import cli, local

TRAIN = {
    "model": {"weights": "none", "input_size": 32},
    "epochs": 1,
    "batch_size": 16,
    "num_workers": 0,
    "threads": 1,
    "progress": False,
    "checkpoint_every": 0,
    "lr": {"range_test": False, "schedule": "fixed", "lr": 0.01},
}


def load_bench(name: str):
    """A bench/ script as a module (bench/ is not a package), for the test of the benchmark's own report."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_experiment(path: Path, run_root: Path) -> Path:
    experiment = {
        "name": "tiny",
        "ingest": {
            "image_size": 32,
            "shard_rows": 8,
            "workers": 1,
            "datasets": [
                {"format": "utkface", "alignment": "trust_crop"},
                {"format": "fer2013_folder", "alignment": "trust_crop"},
            ],
            "split": {"val_fraction": 0.2, "test_fraction": 0.2},
        },
        "teacher": TRAIN,
        "student": TRAIN,
        "pseudolabel": {"batch_size": 64, "threads": 1, "device": "cpu"},
        "evaluate": {"threads": 1, "device": "cpu", "views": []},
        "pipeline": {
            "ingest_shards": 2,
            "shards": 2,
            "baselines": True,
            "single_distill": True,
            "baseline_tasks": ["expression"],
            "run_root": str(run_root),
        },
    }
    path.write_text(yaml.safe_dump(experiment))
    return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = layouts.learnable_utkface_fer(root / "data", per_dataset=24)
    config = tiny_experiment(root / "tiny.yaml", root / "runs")
    return {
        "root": root,
        "config": str(config),
        "data": str(data),
        "cfg": lambda *sets: load_experiment(str(config), list(sets), data_root=str(data)),
    }


@pytest.fixture(scope="module")
def first_run(experiment) -> local.LocalRun:
    return local.run(experiment["cfg"]())


def task_names(result: local.LocalRun) -> set[str]:
    """Executed tasks without their loop-iteration folder: ``for-loop-5-iteration-0/baseline`` -> baseline."""
    return {name.rsplit("/", 1)[-1] for name in result.executed}


def test_whole_pipeline(first_run):
    assert task_names(first_run) == {
        "shard-plan",
        "ingest-shard",
        "ingest-merge",
        "teacher",
        "shard-plan-2",
        "pseudolabel-shard",
        "pseudolabel-merge",
        "student",
        "baseline",
        "gather-models",
        "pseudolabel-single",
        "gather-pseudo",
        "student-single",
        "gather-models-2",
        "evaluate",
    }
    assert first_run.run_dir.name == first_run.run_id  # one id: the run folder is named by it
    assert sum(name.endswith("/ingest-shard") for name in first_run.executed) == 2
    assert sum(name.endswith("/pseudolabel-shard") for name in first_run.executed) == 2
    card = json.loads(Path(first_run.model, layout.MODEL_CARD).read_text())
    assert card["role"] == "student" and card["tasks"] == ["age", "gender", "race", "expression"]
    report = Path(first_run.report).read_text()
    assert report.startswith("<!DOCTYPE html>") or "<html" in report[:200]
    metrics = json.loads(Path(first_run.report).with_name(layout.EVAL_METRICS).read_text())
    assert {"student_single_expression", "baseline_expression", "teacher", "student"} == {
        key.split("/")[0] for key in metrics
    }
    assert {"teacher", "student", "evaluate", "ingest-shard", "ingest-merge", "pseudolabel-merge"} <= {
        name.rsplit("/", 1)[-1] for name in first_run.stage_seconds
    }
    merged = next(first_run.run_dir.glob("pseudolabel-merge/pseudo"))
    pseudo = contracts.read_table(str(merged / layout.PSEUDO_FILE), contracts.PSEUDO)
    assert pseudo.num_rows == 48


def test_second_run_is_all_cache_hits(experiment, first_run, capsys):
    again = local.run(experiment["cfg"]())
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == f"run {again.run_id}: kfp.local's whole output goes to {again.run_dir / local.RUN_LOG}"
    assert shown[1:] and all(line.endswith(": cached") for line in shown[1:])  # one line per task, nothing else
    assert again.executed == [] and again.run_dir == Path(experiment["cfg"]().pipeline.run_root, again.run_id)
    assert again.model == first_run.model
    assert again.wall_seconds < 15


def test_rerun_recomputes_the_stage_and_what_follows(experiment, first_run):
    rerun = local.run(experiment["cfg"](), rerun="student")
    assert task_names(rerun) == {"student", "evaluate"}
    assert rerun.model != first_run.model
    later = local.run(experiment["cfg"]())  # the recomputed results are the ones kept
    assert later.executed == [] and later.model == rerun.model


@pytest.fixture(scope="module")
def published(experiment, first_run):
    prefix = experiment["root"] / "published"
    return prefix, local.run(experiment["cfg"](f"pipeline.publish_prefix={prefix}"))


def test_publish_layout(published):
    prefix, result = published
    assert len(result.executed) == 10 and all(name.startswith("publish") for name in task_names(result))
    run = prefix / result.run_id
    assert result.published == str(run)
    for path in (
        "ingest/faces/_manifest.json",
        "ingest/labels.parquet",
        "ingest/report.md",
        "teacher/model_card.json",
        "teacher/model.safetensors",
        "pseudolabel/pseudo.parquet",
        "student/model.safetensors",
        "student/model_card.json",
        "evaluate/report.html",
        "evaluate/claims.json",
        "baselines/expression/model_card.json",
        "pseudolabel_single/expression/pseudo.parquet",
        "student_single/expression/model_card.json",
    ):
        assert (run / path).is_file(), path
    labels = contracts.read_table(str(run / "ingest/labels.parquet"), contracts.LABELS)
    assert labels.num_rows == contracts.read_manifest(str(run / "ingest/faces"))["rows"] == 48


def test_from_run_imports_what_was_published(experiment, published):
    prefix, result = published
    cfg = experiment["cfg"](f"pipeline.publish_prefix={prefix}")
    rerun = local.run(cfg, rerun="evaluate", from_run=result.run_id)
    ran = task_names(rerun)
    assert "evaluate" in ran and not ran & {
        "ingest",
        "teacher",
        "student",
        "baseline",
        "student-single",
        "pseudolabel-single",
    }
    imported = json.loads(Path(rerun.report).with_name(layout.EVAL_DETAILS).read_text())["models"]
    assert {m["uri"].split(result.run_id + "/")[-1] for m in imported} == {
        "teacher",
        "student",
        "baselines/expression",
        "student_single/expression",
    }
    assert (prefix / rerun.run_id / "evaluate" / layout.EVAL_REPORT_HTML).is_file()


def test_failing_stage_is_one_clear_line(experiment, tmp_path, capsys):
    code = cli.main(
        [
            "run",
            "--config",
            experiment["config"],
            "--data-root",
            str(tmp_path / "missing"),
            "--set",
            f"pipeline.run_root={tmp_path / 'runs'}",
        ]
    )
    assert code == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("d2mtl run: error: the pipeline failed") and "'ingest-shard'" in last
    (log,) = (tmp_path / "runs").glob(f"*/{local.RUN_LOG}")
    assert last.endswith(f"(its log: {log})") and "Executing task" in log.read_text()
    assert "ingest-shard: failed in" in captured.out and "Executing task" not in captured.out
    assert any(line.startswith("  d2mtl ingest_shard: error: ") for line in captured.out.splitlines())


def test_publish_to_s3(experiment, first_run, s3_env):
    """Every stage a cache hit, the publish tasks (subprocesses, keys from the AWS_* variables) upload to S3."""
    result = local.run(experiment["cfg"]("pipeline.publish_prefix=s3://bucket/results"))
    assert all(name.startswith("publish") for name in task_names(result))
    run = f"s3://bucket/results/{result.run_id}"
    assert contracts.read_manifest(f"{run}/ingest/faces")["rows"] == 48
    assert contracts.read_table(f"{run}/ingest/labels.parquet", contracts.LABELS).num_rows == 48
    assert store.exists(f"{run}/student/{layout.WEIGHTS_FILE}")
    assert "<table" in store.read_text(f"{run}/evaluate/{layout.EVAL_REPORT_HTML}")
    assert store.list_files(f"{run}/student_single") == [
        f"{run}/student_single/expression/{name}"
        for name in sorted(p.name for p in Path(first_run.run_dir, "gather-models-2/folder/expression").iterdir())
    ]


def test_bench_reports_the_overhead(first_run):
    bench = load_bench("pipeline_bench")
    compute = sum(first_run.stage_seconds.values())
    section, ratio = bench.report(first_run.run_dir, first_run.wall_seconds, "d2mtl run")
    assert ratio == pytest.approx(first_run.wall_seconds / compute)
    assert "| teacher |" in section and "wall / sum of stages" in section and "expression/fer2013/test" in section


def test_sharded_ingest_gives_the_tables_of_one_pass(experiment, first_run, tmp_path):
    from d2mtl.stages import ingest

    merged = first_run.run_dir / "ingest-merge"
    ingest.run(local.with_absolute_data_root(experiment["cfg"]()).ingest, str(tmp_path))
    names = sorted(p.name for p in (tmp_path / "faces").iterdir())
    assert sorted(p.name for p in (merged / "faces").iterdir()) == names
    for shard in (tmp_path / "faces").iterdir():
        assert (merged / "faces" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert (merged / "labels").read_bytes() == (tmp_path / layout.LABELS_FILE).read_bytes()
