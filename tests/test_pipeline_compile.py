"""The compiled pipeline read back: DAG edges, GPU placement, Secret-based credentials, retries, caching, reruns;
and the submit command's argument handling (no cluster here: kfp.Client is replaced where one is needed)."""

from __future__ import annotations

import ast
import dataclasses
import http.server
import inspect
import json
import textwrap
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from d2mtl import layout
from d2mtl.config import IngestConfig, load_experiment
from d2mtl.errors import UserError
from d2mtl_pipeline import cli, pipeline, submit
from d2mtl_pipeline import compile as compile_module
from d2mtl_pipeline import components as components_module
from d2mtl_pipeline.placement import RERUN_ENV

GPU_FULL = ["pipeline.baselines=true", "pipeline.single_distill=true"]
STAGE_COMPONENTS = (
    "ingest-shard",
    "ingest-merge",
    "teacher",
    "baseline",
    "pseudolabel-shard",
    "pseudolabel-merge",
    "pseudolabel-single",
    "student",
    "student-single",
    "evaluate",
)
GPU_COMPONENTS = ("teacher", "baseline", "pseudolabel-shard", "pseudolabel-single", "student", "student-single")


class Compiled:
    """A compiled pipeline YAML: the pipeline spec and the kfp-kubernetes platform spec."""

    def __init__(self, path: Path):
        self.text = path.read_text()
        docs = list(yaml.safe_load_all(self.text))
        self.spec = docs[0]
        self.platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}

    def tasks(self) -> dict[str, dict]:
        """Every task of every DAG (the root and the loop / condition bodies) by task name."""
        dags = [self.spec["root"]["dag"]] + [c["dag"] for c in self.spec["components"].values() if "dag" in c]
        return {name: task for dag in dags for name, task in dag["tasks"].items()}

    def component_of(self, task: dict) -> str:
        return task["componentRef"]["name"].removeprefix("comp-")

    def tasks_of(self, component: str) -> list[dict]:
        """Tasks of a component (``publish`` also matches publish-2, ...)."""
        return [
            t
            for t in self.tasks().values()
            if self.component_of(t) == component
            or (
                self.component_of(t).startswith(f"{component}-")
                and self.component_of(t).removeprefix(f"{component}-").isdigit()
            )
        ]

    def executor(self, task: dict) -> dict:
        return self.spec["deploymentSpec"]["executors"][
            self.spec["components"][task["componentRef"]["name"]]["executorLabel"]
        ]

    def platform_of(self, task: dict) -> dict:
        return self.platform.get(self.spec["components"][task["componentRef"]["name"]]["executorLabel"], {})


def compile_cli(tmp_path: Path, *args: str, name: str = "pipeline.yaml") -> Compiled:
    out = tmp_path / name
    assert cli.main(["compile", "--out", str(out), *args]) == 0
    return Compiled(out)


@pytest.fixture(scope="module")
def gpu(tmp_path_factory) -> Compiled:
    overrides = [f"--set={item}" for item in GPU_FULL]
    return compile_cli(
        tmp_path_factory.mktemp("gpu"),
        "--config",
        "gpu",
        *overrides,
        "--set=store.access_key=ACCESS-KEY-IN-CONFIG",
        "--set=store.secret_key=SECRET-IN-CONFIG",
    )


def root_task(compiled: Compiled, component: str) -> tuple[str, dict]:
    (found,) = [
        (n, t) for n, t in compiled.spec["root"]["dag"]["tasks"].items() if compiled.component_of(t) == component
    ]
    return found


def loop_containing(compiled: Compiled, component: str) -> str:
    """The root task name of the ParallelFor whose body runs ``component``."""
    for name, task in compiled.spec["root"]["dag"]["tasks"].items():
        body = compiled.spec["components"][task["componentRef"]["name"]].get("dag", {}).get("tasks", {})
        if "parameterIterator" in task and any(compiled.component_of(t) == component for t in body.values()):
            return name
    raise AssertionError(f"no loop runs {component}")


def iterated_plan(compiled: Compiled, loop: str) -> str:
    """The shard-plan task whose output the loop iterates over."""
    channel = compiled.tasks()[loop]["parameterIterator"]["items"]["inputParameter"]
    plan = channel.removeprefix("pipelinechannel--").removesuffix("-Output")
    assert compiled.component_of(compiled.tasks()[plan]).startswith("shard-plan")
    return plan


def test_ingest_fans_out_then_merges(gpu):
    deps = {name: set(task.get("dependentTasks", [])) for name, task in gpu.spec["root"]["dag"]["tasks"].items()}
    shards = loop_containing(gpu, "ingest-shard")
    merge, merge_task = root_task(gpu, "ingest-merge")
    plan = iterated_plan(gpu, shards)
    assert deps[shards] == {plan} and deps[merge] == {shards} and deps[plan] == set()
    assert gpu.tasks()[plan]["inputs"]["parameters"]["shards"] == {"componentInputParameter": "ingest_shards"}
    (shard,) = gpu.tasks_of("ingest-shard")
    assert shard["inputs"]["parameters"]["shards"] == {"componentInputParameter": "pipelinechannel--ingest_shards"}
    assert shard["inputs"]["parameters"]["shard"]["componentInputParameter"].endswith("loop-item")
    (collected,) = merge_task["inputs"]["artifacts"].values()
    assert collected["taskOutputArtifact"] == {
        "outputArtifactKey": "pipelinechannel--ingest-shard-part",
        "producerTask": shards,
    }
    for consumer in ("teacher", "student", "evaluate"):
        (task,) = gpu.tasks_of(consumer)
        for name in ("faces", "labels"):
            assert task["inputs"]["artifacts"][name]["taskOutputArtifact"]["producerTask"] == merge, consumer


def test_dag_edges(gpu):
    deps = {name: set(task.get("dependentTasks", [])) for name, task in gpu.spec["root"]["dag"]["tasks"].items()}
    ingest, _ = root_task(gpu, "ingest-merge")
    teacher, _ = root_task(gpu, "teacher")
    merge, _ = root_task(gpu, "pseudolabel-merge")
    student, _ = root_task(gpu, "student")
    evaluate, _ = root_task(gpu, "evaluate")
    gather_pseudo, _ = root_task(gpu, "gather-pseudo")
    shards = loop_containing(gpu, "pseudolabel-shard")
    baselines = loop_containing(gpu, "baseline")
    singles = loop_containing(gpu, "pseudolabel-single")
    students = loop_containing(gpu, "student-single")
    gathered = {
        gpu.tasks()[name]["inputs"]["artifacts"]["items"]["taskOutputArtifact"]["producerTask"]: name
        for name in deps
        if gpu.component_of(gpu.tasks()[name]).startswith("gather-")
    }
    assert deps[teacher] == {ingest}
    assert {teacher, ingest} <= deps[shards]
    assert deps[merge] == {shards}
    assert {merge, teacher, ingest} <= deps[student]
    assert deps[baselines] == {ingest}
    assert deps[gathered[baselines]] == {baselines}
    assert deps[singles] == {gathered[baselines], ingest}
    assert gathered[singles] == gather_pseudo
    assert deps[students] == {gather_pseudo, gathered[baselines], ingest}
    assert {student, teacher, gathered[baselines], gathered[students], ingest} <= deps[evaluate]
    # the shard loop iterates over its shard plan (of the shards parameter); the per-task loops over baseline_tasks
    plan = iterated_plan(gpu, shards)
    assert gpu.tasks()[plan]["inputs"]["parameters"]["shards"] == {"componentInputParameter": "shards"}
    for loop in (baselines, singles, students):
        assert gpu.tasks()[loop]["parameterIterator"]["items"]["inputParameter"].endswith("baseline_tasks")
    evaluate_inputs = gpu.tasks()[evaluate]["inputs"]["artifacts"]
    assert {"baselines", "single_students", "teacher", "student", "faces", "labels"} <= set(evaluate_inputs)


def test_parameters_carry_each_stage_config(gpu):
    params = gpu.spec["root"]["inputDefinitions"]["parameters"]
    cfg = load_experiment("gpu", GPU_FULL)
    assert IngestConfig.model_validate_json(params["ingest_config"]["defaultValue"]) == cfg.ingest
    assert params["shards"]["defaultValue"] == cfg.pipeline.shards == 4
    assert params["ingest_shards"]["defaultValue"] == cfg.pipeline.ingest_shards == 4
    assert all(p.get("description") for p in params.values()), "every pipeline parameter is documented"


def test_gpu_stages_get_gpu_nodes(gpu):
    for component in STAGE_COMPONENTS:
        (task, *_) = gpu.tasks_of(component)
        resources = gpu.executor(task)["container"]["resources"]
        platform = gpu.platform_of(task)
        if component in GPU_COMPONENTS:
            accelerator = resources["accelerator"]
            assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "1"), component
            assert platform["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert platform["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
            (shm,) = platform["emptyDirMounts"]
            assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory" and shm["sizeLimit"] == "8Gi"
        else:
            assert "accelerator" not in resources and "nodeSelector" not in platform, component
        assert resources["resourceCpuRequest"] and resources["resourceMemoryLimit"], component
    images = {
        gpu.component_of(t): gpu.executor(t)["container"]["image"]
        for t in gpu.tasks().values()
        if "componentRef" in t and gpu.component_of(t) in STAGE_COMPONENTS
    }
    assert images["teacher"].startswith("ghcr.io/distill-2md-mtl/d2mtl-train-cuda:")
    assert images["ingest-shard"].startswith("ghcr.io/distill-2md-mtl/d2mtl-ingest:")
    assert images["ingest-merge"].startswith("ghcr.io/distill-2md-mtl/d2mtl-ingest:")


def test_credentials_come_from_the_secret_only(gpu):
    executors = gpu.spec["deploymentSpec"]["executors"]
    for label, executor in executors.items():
        if "container" not in executor:
            continue
        (secret,) = gpu.platform[label]["secretAsEnv"]
        assert secret["secretName"] == "d2mtl-object-store"
        assert {k["envVar"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "SECRET-IN-CONFIG" not in gpu.text and "ACCESS-KEY-IN-CONFIG" not in gpu.text
    store_param = json.loads(gpu.spec["root"]["inputDefinitions"]["parameters"]["store"]["defaultValue"])
    assert "access_key" not in store_param and "secret_key" not in store_param


def test_retries_and_caching(gpu):
    for component in STAGE_COMPONENTS:
        for task in gpu.tasks_of(component):
            assert task["retryPolicy"] == {
                "backoffDuration": "60s",
                "backoffFactor": 2.0,
                "backoffMaxDuration": "3600s",
                "maxRetryCount": 2,
            }, component
            assert task["cachingOptions"] == {"enableCache": True}, component
    publishes = gpu.tasks_of("publish")
    assert len(publishes) >= 8
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in publishes)
    # publishing happens only when a prefix is given
    conditions = [t["triggerPolicy"]["condition"] for t in gpu.tasks().values() if "triggerPolicy" in t]
    assert conditions and all("publish_prefix" in c and "!= ''" in c for c in conditions)


def test_cpu_profile_has_no_gpu_and_no_optional_stages(tmp_path):
    cpu = compile_cli(tmp_path)
    assert not any(
        "accelerator" in e.get("container", {}).get("resources", {})
        for e in cpu.spec["deploymentSpec"]["executors"].values()
    )
    components = {cpu.component_of(t) for t in cpu.tasks().values()}
    assert not components & {"baseline", "pseudolabel-single", "student-single"}
    assert "pseudolabel-shard" in components


def test_rerun_from_run_imports_upstream(tmp_path):
    compiled = compile_cli(
        tmp_path,
        "--config",
        "gpu",
        *[f"--set={i}" for i in GPU_FULL],
        "--set=pipeline.publish_prefix=s3://results/d2mtl",
        "--rerun",
        "student",
        "--from-run",
        "run-7",
    )
    components = {compiled.component_of(t) for t in compiled.tasks().values()}
    assert not components & {
        "ingest-shard",
        "ingest-merge",
        "shard-plan",
        "teacher",
        "pseudolabel-shard",
        "pseudolabel-merge",
        "baseline",
        "pseudolabel-single",
        "student-single",
    }
    assert {"student", "evaluate"} <= components
    imported = {
        e["importer"]["artifactUri"]["constant"]
        for e in compiled.spec["deploymentSpec"]["executors"].values()
        if "importer" in e
    }
    assert imported == {
        f"s3://results/d2mtl/run-7/{p}"
        for p in (
            "ingest/faces",
            "ingest/labels.parquet",
            "teacher",
            "pseudolabel",
            "baselines",
            "pseudolabel_single",
            "student_single",
        )
    }
    (student,) = compiled.tasks_of("student")
    assert not student.get("cachingOptions", {}).get("enableCache"), "the rerun stage never reuses the cache"
    (evaluate,) = compiled.tasks_of("evaluate")
    assert evaluate["cachingOptions"] == {"enableCache": True}


def test_rerun_needs_a_prefix_and_a_known_stage(tmp_path, capsys):
    assert cli.main(["compile", "--out", str(tmp_path / "p.yaml"), "--rerun", "student", "--from-run", "r1"]) == 2
    assert "publish_prefix" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "compile",
                "--out",
                str(tmp_path / "p.yaml"),
                "--rerun",
                "baselines",
                "--from-run",
                "r1",
                "--set=pipeline.publish_prefix=s3://b/p",
            ]
        )
        == 2
    )
    assert "baselines / single_distill are off" in capsys.readouterr().err
    assert cli.main(["compile", "--out", str(tmp_path / "p.yaml"), "--rerun", "student"]) == 2
    assert "go together" in capsys.readouterr().err


def test_downstream_stages():
    cfg = load_experiment("gpu", GPU_FULL).pipeline
    stages = pipeline.enabled_stages(cfg)
    assert pipeline.downstream("teacher", stages) == {"teacher", "pseudolabel", "student", "evaluate"}
    assert pipeline.downstream("baselines", stages) == {"baselines", "pseudolabel_single", "student_single", "evaluate"}
    assert pipeline.downstream("ingest", stages) == set(stages)
    cpu = pipeline.enabled_stages(load_experiment("cpu").pipeline)
    assert pipeline.downstream("ingest", cpu) == {"ingest", "teacher", "pseudolabel", "student", "evaluate"}


def test_the_stage_table_names_every_image_resources_component_and_switch():
    from d2mtl.config.pipeline import PipelineConfig, StageImages, StageResources

    table = layout.STAGES.values()
    images = {stage.image for stage in table} | set(components_module.STAGELESS_IMAGES.values())
    assert images == set(StageImages.model_fields) - {"registry", "tag"}
    assert {stage.resources for stage in table} | {"utility"} == set(StageResources.model_fields)
    listed = [name for stage in table for name in stage.components] + list(components_module.STAGELESS_IMAGES)
    assert sorted(listed) == sorted(field.name for field in dataclasses.fields(components_module.Components))
    assert {stage.switch for stage in table if stage.switch} <= set(PipelineConfig.model_fields)
    order = list(layout.STAGES)
    assert all(order.index(parent) < order.index(stage.name) for stage in table for parent in stage.upstream)


def test_local_rerun_tokens_mark_only_that_stage(tmp_path):
    from kfp import compiler

    cfg = load_experiment("cpu")
    out = tmp_path / "local.yaml"
    compiler.Compiler().compile(pipeline.build(cfg, local=True, rerun_tokens={"pseudolabel": "t1"}), str(out))
    compiled = Compiled(out)
    expected = {
        iterated_plan(compiled, loop_containing(compiled, "pseudolabel-shard")),
        "pseudolabel-shard",
        "pseudolabel-merge",
    }
    for name, task in compiled.tasks().items():
        if "componentRef" not in task or "dag" in compiled.spec["components"][task["componentRef"]["name"]]:
            continue
        env = {e["name"]: e["value"] for e in compiled.executor(task)["container"].get("env", [])}
        assert (env.get(RERUN_ENV) == "t1") == (name in expected), name
        assert "retryPolicy" not in task, "local runs never retry"


def test_check_published_lists_what_is_missing(tmp_path):
    cfg = load_experiment("cpu", ["pipeline.publish_prefix=" + str(tmp_path)])
    reuse = compile_module.plan_rerun(cfg, "student", "r1")
    expected = compile_module.imported_objects(cfg, reuse, cfg.pipeline.baseline_tasks)
    assert sorted(Path(u).relative_to(tmp_path / "r1").as_posix() for u in expected) == [
        "ingest/faces/_manifest.json",
        "ingest/labels.parquet",
        "pseudolabel/pseudo.parquet",
        "teacher/model_card.json",
    ]
    for uri in expected[1:]:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        Path(uri).write_text("{}")
    with pytest.raises(UserError, match=r"missing .*_manifest\.json"):
        compile_module.check_published(cfg, reuse, [])
    Path(expected[0]).parent.mkdir(parents=True, exist_ok=True)
    Path(expected[0]).write_text("{}")
    compile_module.check_published(cfg, reuse, [])


# ---- submit ---------------------------------------------------------------------------------------


def test_unreachable_host_is_one_line(capsys):
    assert cli.main(["submit", "--host", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("d2mtl submit: error: cannot reach Kubeflow Pipelines at http://127.0.0.1:9")


def test_params_are_typed_and_checked():
    types = {"shards": "NUMBER_INTEGER", "publish_prefix": "STRING", "baseline_tasks": "LIST"}
    assert submit.parse_params(["shards=8", "publish_prefix=s3://b/p", "baseline_tasks=[age, race]"], types) == {
        "shards": 8,
        "publish_prefix": "s3://b/p",
        "baseline_tasks": ["age", "race"],
    }
    with pytest.raises(UserError, match="no such parameter"):
        submit.parse_params(["shard=8"], types)
    with pytest.raises(UserError, match="expected an integer"):
        submit.parse_params(["shards=eight"], types)
    with pytest.raises(UserError, match="expected a list"):
        submit.parse_params(["baseline_tasks=age"], types)


class FakeClient:
    """Stands in for kfp.Client: records the submission."""

    calls: ClassVar[list[dict]] = []

    def __init__(self, host, namespace):
        self.host = host

    def create_run_from_pipeline_package(self, package, **kwargs):
        FakeClient.calls.append({"package": Compiled(Path(package)), **kwargs})
        return type("Run", (), {"run_id": "run-42"})()


def test_submit_passes_params_experiment_and_caching(monkeypatch, capsys):
    import kfp

    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.setattr(submit, "check_kfp_api", lambda host: None)  # no KFP API to ask here
    FakeClient.calls.clear()
    assert (
        cli.main(
            [
                "submit",
                "--config",
                "gpu",
                "--host",
                "http://kfp.example:8080",
                "--experiment",
                "ablations",
                "--param",
                "shards=8",
                "--param",
                "publish_prefix=s3://b/results",
            ]
        )
        == 0
    )
    (call,) = FakeClient.calls
    assert call["arguments"] == {"shards": 8, "publish_prefix": "s3://b/results"}
    assert call["experiment_name"] == "ablations" and call["enable_caching"] is True
    assert "submitted run run-42: http://kfp.example:8080/#/runs/details/run-42" in capsys.readouterr().out


def test_submit_rerun_checks_the_earlier_run(monkeypatch, capsys, s3_env):
    import kfp

    from d2mtl import store

    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.setattr(submit, "check_kfp_api", lambda host: None)  # no KFP API to ask here
    FakeClient.calls.clear()
    args = [
        "submit",
        "--host",
        "http://kfp.example:8080",
        "--param",
        "publish_prefix=s3://bucket/results",
        "--set",
        f"store.endpoint={s3_env['endpoint']}",
        "--rerun",
        "evaluate",
        "--from-run",
        "r9",
    ]
    assert cli.main(args) == 2
    assert "run r9 has not published" in capsys.readouterr().err
    for marker in (
        "ingest/faces/_manifest.json",
        "ingest/labels.parquet",
        "teacher/model_card.json",
        "pseudolabel/pseudo.parquet",
        "student/model_card.json",
    ):
        store.write_text(f"s3://bucket/results/r9/{marker}", "{}")
    assert cli.main(args) == 0
    (call,) = FakeClient.calls
    assert call["run_name"] == "cpu rerun evaluate from r9"
    assert {t["componentRef"]["name"] for t in call["package"].spec["root"]["dag"]["tasks"].values()} >= {
        "comp-evaluate",
        "comp-importer",
    }
    assert cli.main(["submit", "--host", "http://x", "--param", "publish_prefix=/tmp/here"]) == 2
    assert "object storage" in capsys.readouterr().err


def test_holdout_mode_hides_labels_from_the_teachers(tmp_path):
    compiled = compile_cli(tmp_path, *[f"--set={i}" for i in GPU_FULL], "--set=pseudolabel.holdout.fraction=0.2")
    (holdout,) = compiled.tasks_of("holdout")
    holdout_name = next(n for n, t in compiled.tasks().items() if t is holdout)
    for component in ("teacher", "baseline"):
        (task,) = compiled.tasks_of(component)
        source = task["inputs"]["artifacts"]["labels"]
        producer = source.get("taskOutputArtifact") or source["componentInputArtifact"]
        assert holdout_name in json.dumps(producer) and "train_labels" in json.dumps(producer), component
    (shard,) = compiled.tasks_of("pseudolabel-shard")
    assert "holdout" not in json.dumps(shard["inputs"]["artifacts"]["labels"]), "pseudo-labels see every label"
    (evaluate,) = compiled.tasks_of("evaluate")
    assert "pseudo" in evaluate["inputs"]["artifacts"]


def test_steps_import_no_torch():
    """publish, gather and the shard plan run in the ingest image, which has no torch."""
    import subprocess
    import sys

    code = "import sys, d2mtl_pipeline.steps, d2mtl_pipeline.components; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---- the steps' glue ------------------------------------------------------------------------------


def artifact(path: Path):
    return type("Artifact", (), {"path": str(path), "name": path.name})()


def test_gather_names_each_output_by_its_task(tmp_path):
    from d2mtl.config.train import ModelConfig
    from d2mtl.models import ModelSpec, MultiTaskNet, save_model
    from d2mtl_pipeline import steps

    for name, tasks in (("m1", ["age"]), ("m2", ["race"]), ("mtl", ["age", "race"])):
        save_model(MultiTaskNet(ModelSpec.from_config(ModelConfig(), tasks), weights=None), str(tmp_path / name))
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / "report.json").write_text(json.dumps({"tasks": ["gender"]}))
    steps.gather([artifact(tmp_path / n) for n in ("m1", "m2", "p1")], artifact(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["age", "gender", "race"]
    assert steps.member(str(tmp_path / "out"), "race") == str(tmp_path / "out" / "race")
    with pytest.raises(UserError, match=r"no 'expression' in .* holds age, gender, race"):
        steps.member(str(tmp_path / "out"), "expression")
    with pytest.raises(UserError, match="not single-task"):
        steps.gather([artifact(tmp_path / "mtl")], artifact(tmp_path / "out2"))


def test_metrics_and_confusion_for_the_ui(tmp_path):
    from d2mtl_pipeline import steps

    assert steps.flat_numbers({"a": 1, "b": {"c": 2.5, "d": "text", "e": True}, "f": [1]}) == {"a": 1.0, "b/c": 2.5}
    confusion = [
        {"model": "student", "task": "expression", "split": "test", "categories": ["x", "y"], "matrix": m}
        for m in ([[1, 0], [0, 1]], [[5, 1], [2, 9]])
    ]
    confusion.append({**confusion[1], "model": "teacher", "matrix": [[50, 0], [0, 50]]})
    (tmp_path / "evaluation.json").write_text(json.dumps({"confusion": confusion}))
    assert steps.headline_confusion(str(tmp_path), "student", "expression", "test")["matrix"] == [[5, 1], [2, 9]]
    assert steps.headline_confusion(str(tmp_path), "student", "gender", "test") is None


STEP_ARGUMENT_RENAMES = {"store_settings": "store"}  # step parameter -> the component's (steps.py has a store module)


def test_components_call_their_step_with_every_parameter_by_name():
    """Each component body passes every parameter of its step by name, each from the component's parameter of the
    same name (or its .path): swapping two artifacts of one type cannot pass unnoticed."""
    from d2mtl_pipeline import steps

    for field in dataclasses.fields(components_module.Components):
        func = getattr(components_module, field.name)
        calls = [
            node
            for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(func))))
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "steps.main"
        ]
        if field.name == "shard_plan":
            assert not calls
            continue
        (call,) = calls
        (step_name,) = [ast.unparse(arg) for arg in call.args]
        step = getattr(steps, step_name.removeprefix("steps."))
        names = [keyword.arg for keyword in call.keywords]
        assert sorted(names) == sorted(inspect.signature(step).parameters), field.name
        own = set(inspect.signature(func).parameters)
        for keyword in call.keywords:
            value = keyword.value
            source = value.value if isinstance(value, ast.Attribute) and value.attr == "path" else value
            if isinstance(source, ast.Name) and source.id in own:
                assert source.id == STEP_ARGUMENT_RENAMES.get(keyword.arg, keyword.arg), (field.name, keyword.arg)


def test_a_step_called_with_a_wrong_or_missing_name_fails_before_it_runs():
    from d2mtl_pipeline import steps

    with pytest.raises(TypeError, match="gather takes items, folder; called with items, target"):
        steps.main(steps.gather, items=[], target=None)
    with pytest.raises(TypeError, match="called with config, faces"):
        steps.main(steps.student, config="{}", faces=None)


def test_steps_report_a_bad_config_as_one_line(capsys):
    from d2mtl.config import TrainConfig
    from d2mtl_pipeline import steps

    with pytest.raises(SystemExit) as exit_info:
        steps.main(steps.validate, model=TrainConfig, config_json='{"epochs": 0, "nonsense": 1}', what="teacher")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("d2mtl validate: error: invalid teacher config:") and "nonsense" in err
    assert len(err.splitlines()) == 1


class _Answers(http.server.BaseHTTPRequestHandler):
    """GET /apis/v2beta1/healthz: KFP's JSON when the server is told to be KFP, else python -m http.server's 404."""

    def do_GET(self):
        if self.server.kfp and self.path == submit.HEALTHZ:
            body, status, kind = b'{"multi_user": false}', 200, "application/json"
        else:
            body, status, kind = b"<html>Error 404: File not found</html>", 404, "text/html"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(params=[False, True], ids=["not-kfp", "kfp"])
def http_host(request):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    server.kfp = request.param
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", request.param
    server.shutdown()
    server.server_close()


def test_a_host_that_answers_but_is_not_kfp_is_one_line_at_once(http_host, capsys):
    host, is_kfp = http_host
    if is_kfp:
        submit.check_kfp_api(host)
        return
    started = time.perf_counter()
    assert cli.main(["submit", "--host", host]) == 2
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - started < 15 and len(err.splitlines()) == 1, err
    assert err.startswith(f"d2mtl submit: error: {host}/apis/v2beta1/healthz answered 404 Not Found (BaseHTTP/")
    assert "not a Kubeflow Pipelines API" in err
