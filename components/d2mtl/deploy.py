"""The KServe InferenceService that serves a published model, and its create-or-update through the kserve client.

``inference_service()`` builds the object: a custom predictor running ``d2mtl serve`` in the serve image, the
model at ``storage_uri`` (KServe's storage initializer downloads it to /mnt/models), KServe's request batcher on,
a readiness probe on the model's v2 ready endpoint. manifests/serving/inferenceservice.yaml is this object for the
default ``ServingConfig`` (tests/test_manifests.py keeps them equal). ``apply()`` creates it, or merges it
into the InferenceService of that name.
"""

from __future__ import annotations

import json
import logging
import os

from d2mtl.config.pipeline import ServingConfig
from d2mtl.errors import UserError

log = logging.getLogger(__name__)

MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storageUri's files
PORT = 8080
PART_OF = {"app.kubernetes.io/part-of": "distill-2md-mtl"}


def inference_service(settings: ServingConfig, image: str, storage_uri: str) -> dict:
    """The InferenceService serving the model folder at ``storage_uri`` with the d2mtl serve ``image``."""
    resources = {"cpu": settings.cpu, "memory": settings.memory}
    container = {
        "name": "kserve-container",
        "image": image,
        "args": [
            "serve",
            "--model",
            MODEL_MOUNT,
            "--port",
            str(PORT),
            "--name",
            settings.name,
            "--max-request-mb",
            f"{settings.max_request_mb:g}",
        ],
        "env": [{"name": "STORAGE_URI", "value": storage_uri}],  # a custom predictor's storageUri
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "readinessProbe": {
            "httpGet": {"path": f"/v2/models/{settings.name}/ready", "port": PORT},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
    }
    metadata: dict = {"name": settings.name, "labels": dict(PART_OF)}
    if settings.namespace:
        metadata["namespace"] = settings.namespace
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {
            "predictor": {
                "serviceAccountName": settings.service_account,
                "minReplicas": settings.min_replicas,
                "batcher": {"maxBatchSize": settings.max_batch_size, "maxLatency": settings.max_latency_ms},
                "containers": [container],
            }
        },
    }


def apply(service: dict) -> str:
    """Create ``service``, or merge it into the existing InferenceService of its name; returns what was done.

    The cluster comes from the pod's service account inside Kubernetes, else from the kubeconfig ($KUBECONFIG)."""
    from kserve import KServeClient, constants
    from kserve.utils.utils import get_default_target_namespace
    from kubernetes.client.rest import ApiException
    from kubernetes.config import ConfigException

    try:  # the kubernetes package reads $KUBECONFIG once, when imported: pass today's value
        client = KServeClient(config_file=os.environ.get("KUBECONFIG"))
    except ConfigException as err:
        raise UserError(f"no Kubernetes cluster to deploy to: {one_line(str(err))}") from None
    name = service["metadata"]["name"]
    namespace = service["metadata"].get("namespace") or get_default_target_namespace()
    where = f"InferenceService {namespace}/{name}"
    collection = (
        constants.KSERVE_GROUP,
        constants.KSERVE_V1BETA1_VERSION,
        namespace,
        constants.KSERVE_PLURAL_INFERENCESERVICE,
    )
    try:  # the client's create() / patch() want its model objects and turn API errors into RuntimeError text
        client.api_instance.create_namespaced_custom_object(*collection, service)
        done = "created"
    except ApiException as err:
        if err.status != 409:  # 409: it exists
            raise UserError(f"{where}: the cluster refused it ({err.status}: {one_line(err.body)})") from None
        try:
            client.api_instance.patch_namespaced_custom_object(*collection, name, service)  # a merge patch
        except ApiException as patch_error:
            raise UserError(f"{where}: update refused ({patch_error.status}: {one_line(patch_error.body)})") from None
        done = "updated"
    log.info("%s %s (model %s)", done, where, service["spec"]["predictor"]["containers"][0]["env"][0]["value"])
    return done


def one_line(text: str | bytes | None) -> str:
    """The message of a Kubernetes API error body (a Status object), or the text's first line."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    try:
        return json.loads(text)["message"]
    except (TypeError, ValueError, KeyError):
        return (text or "").strip().splitlines()[0] if (text or "").strip() else "no details"
