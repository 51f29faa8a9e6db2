"""The pipeline's deploy step, checked without a cluster: in the compiled pipeline only when asked, and its
create-or-update through the kserve client against a fake Kubernetes API on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import yaml
from conftest import free_port

from d2mtl.config.pipeline import PipelineConfig, ServingConfig, StageImages
from d2mtl.errors import UserError

pytest.importorskip("kserve", reason="the deploy step needs the serve extra: pip install -e '.[serve]'")

# ---- the deploy step in the pipeline ----------------------------------------------------------------


def compiled(tmp_path, *overrides: str) -> dict:
    from d2mtl_pipeline.cli import main

    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--out", str(out), *(arg for item in overrides for arg in ("--set", item))]) == 0
    return next(yaml.safe_load_all(out.read_text()))


def tasks_by_name(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline, also those inside conditions and loops."""
    found, todo = {}, [spec["root"]["dag"]]
    while todo:
        for name, task in todo.pop().get("tasks", {}).items():
            found[name] = task
            todo += [spec["components"][task["componentRef"]["name"]].get("dag", {})]
    return found


def test_the_pipeline_deploys_only_when_asked(tmp_path):
    assert "deploy" not in tasks_by_name(compiled(tmp_path))
    spec = compiled(
        tmp_path,
        "pipeline.deploy=true",
        "pipeline.publish_prefix=s3://d2mtl/results",
        "pipeline.serving.max_batch_size=8",
    )
    tasks = tasks_by_name(spec)
    deploy = tasks["deploy"]
    (publish,) = deploy["dependentTasks"]
    assert tasks[publish]["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"] == "student"
    assert deploy["inputs"]["parameters"]["model"]["taskOutputParameter"]["producerTask"] == publish
    settings = json.loads(deploy["inputs"]["parameters"]["serving"]["runtimeValue"]["constant"])
    assert settings["max_batch_size"] == 8
    condition = next(
        task
        for task in tasks.values()
        if spec["components"][task["componentRef"]["name"]].get("dag", {}).get("tasks", {}).get("deploy")
    )
    assert "evaluate" in condition["dependentTasks"], "deploy comes last, after evaluate"
    image = spec["deploymentSpec"]["executors"]["exec-deploy"]["container"]["image"]
    assert image == StageImages().reference("serve")


def test_deploy_needs_a_publish_prefix():
    with pytest.raises(ValueError, match="publish_prefix"):
        PipelineConfig(deploy=True)


# ---- create or update, through the kserve client ----------------------------------------------------


class FakeKubernetes(BaseHTTPRequestHandler):
    """InferenceServices in memory: POST creates (409 when it exists), PATCH merges the spec, GET reads."""

    services: ClassVar[dict[str, dict]] = {}
    calls: ClassVar[list[tuple[str, str, str]]] = []

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def do_POST(self):
        self.calls.append(("POST", self.path, self.headers.get("Content-Type")))
        service = self.body()
        if service["metadata"]["name"] in self.services:
            return self.answer(
                409,
                {
                    "kind": "Status",
                    "reason": "AlreadyExists",
                    "code": 409,
                    "message": 'inferenceservices.serving.kserve.io "d2mtl" already exists',
                },
            )
        self.services[service["metadata"]["name"]] = service
        return self.answer(201, service)

    def do_PATCH(self):
        self.calls.append(("PATCH", self.path, self.headers.get("Content-Type")))
        name = self.path.rsplit("/", 1)[1]
        self.services[name] = {**self.services[name], "spec": self.body()["spec"]}
        return self.answer(200, self.services[name])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def kubernetes_api(tmp_path, monkeypatch):
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), FakeKubernetes)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "fake", "user": {"token": "test"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "ml"}}],
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    FakeKubernetes.services, FakeKubernetes.calls = {}, []
    yield FakeKubernetes
    server.shutdown()


def test_deploy_creates_then_updates_the_inference_service(kubernetes_api):
    from d2mtl_pipeline import steps

    settings = ServingConfig(namespace="serving").model_dump_json()
    image = StageImages().reference("serve")
    assert steps.deploy(settings, image, "minio://d2mtl/results/run-1/student") == "s3://d2mtl/results/run-1/student"
    assert steps.deploy(settings, image, "s3://d2mtl/results/run-2/student") == "s3://d2mtl/results/run-2/student"
    collection = "/apis/serving.kserve.io/v1beta1/namespaces/serving/inferenceservices"
    assert [call[:2] for call in kubernetes_api.calls] == [
        ("POST", collection),
        ("POST", collection),
        ("PATCH", f"{collection}/d2mtl"),
    ]
    assert kubernetes_api.calls[-1][2] == "application/merge-patch+json"
    (container,) = kubernetes_api.services["d2mtl"]["spec"]["predictor"]["containers"]
    assert container["env"] == [{"name": "STORAGE_URI", "value": "s3://d2mtl/results/run-2/student"}]


def test_deploy_refuses_a_model_outside_object_storage_and_a_missing_cluster(tmp_path, monkeypatch):
    from d2mtl_pipeline import steps

    settings, image = ServingConfig().model_dump_json(), StageImages().reference("serve")
    with pytest.raises(UserError, match="object storage"):
        steps.deploy(settings, image, str(tmp_path / "student"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(UserError, match="no Kubernetes cluster"):
        steps.deploy(settings, image, "s3://d2mtl/results/run-1/student")
