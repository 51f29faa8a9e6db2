"""``d2mtl submit``: compile the pipeline and start a run on a Kubeflow Pipelines endpoint (``kfp.Client``)."""

from __future__ import annotations

import json
import logging
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import yaml

from d2mtl import store
from d2mtl.config import ExperimentConfig
from d2mtl.errors import UserError
from d2mtl_pipeline import compile as compile_module

PARAMETER_TYPES = {  # KFP IR parameter type -> (how a --param value is read, what it must be)
    "STRING": (str, "text"),
    "NUMBER_INTEGER": (int, "an integer"),
    "NUMBER_DOUBLE": (float, "a number"),
    "BOOLEAN": (yaml.safe_load, "true or false"),
    "LIST": (yaml.safe_load, "a list, e.g. [age, gender]"),
    "STRUCT": (yaml.safe_load, "a mapping, e.g. {a: 1}"),
}
PYTHON_TYPES = {"BOOLEAN": bool, "LIST": list, "STRUCT": dict}
HEALTHZ = "/apis/v2beta1/healthz"  # what kfp.Client asks first
ENDPOINT_HINT = (
    "(is the endpoint right? e.g. kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80, then "
    "--host http://localhost:8080)"
)


def pipeline_parameters(package: str) -> dict[str, str]:
    """Parameter name -> KFP IR type of a compiled pipeline."""
    spec = next(yaml.safe_load_all(Path(package).read_text()))
    return {name: p["parameterType"] for name, p in spec["root"]["inputDefinitions"]["parameters"].items()}


def parse_params(items: list[str], types: dict[str, str]) -> dict[str, Any]:
    """``k=v`` strings -> run arguments, each read as its parameter's type."""
    arguments = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--param {item!r}: expected NAME=VALUE")
        if name not in types:
            raise UserError(f"--param {name}: the pipeline has no such parameter; parameters: {', '.join(types)}")
        read, expected = PARAMETER_TYPES[types[name]]
        try:
            value = read(text)
        except (ValueError, yaml.YAMLError):
            value = None
        if value is None or not isinstance(value, PYTHON_TYPES.get(types[name], object)):
            raise UserError(f"--param {name}={text!r}: expected {expected}")
        arguments[name] = value
    return arguments


def unreachable(host: str, err: Exception) -> UserError:
    reason = getattr(err, "reason", None) or err
    return UserError(
        f"cannot reach Kubeflow Pipelines at {host}: {type(reason).__name__}: "
        f"{str(reason).splitlines()[0][:200]} {ENDPOINT_HINT}"
    )


def check_kfp_api(host: str, timeout_s: float = 10.0) -> None:
    """One GET of the KFP API's health endpoint: a host that does not answer, or answers but is not Kubeflow
    Pipelines, is one line within seconds (kfp.Client would retry its health check for ~25 s, logging a traceback
    each time, and end in a TimeoutError that hides what answered)."""
    url = host.rstrip("/") + HEALTHZ
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            kind, body = response.headers.get_content_type(), response.read(65536)
    except urllib.error.HTTPError as err:
        raise UserError(
            f"{url} answered {err.code} {err.reason} ({err.headers.get('Server') or 'no Server header'}): "
            f"not a Kubeflow Pipelines API {ENDPOINT_HINT}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise unreachable(host, err) from None
    try:
        json_object = isinstance(json.loads(body), dict)
    except ValueError:
        json_object = False
    if kind != "application/json" or not json_object:
        raise UserError(f"{url} answered with {kind}, not the JSON of a Kubeflow Pipelines API {ENDPOINT_HINT}")


def connect(host: str, namespace: str | None):
    """A ``kfp.Client``; an endpoint that does not answer, or is not KFP, is one clear UserError."""
    import kfp
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    check_kfp_api(host)
    retries_log = logging.getLogger("urllib3.connectionpool")
    level = retries_log.level
    retries_log.setLevel(logging.ERROR)  # its "Retrying ..." lines would bury the one line below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "this client only works with KFP >= 2.0.0-beta.2"
        try:
            return kfp.Client(host=host, namespace=namespace or "kubeflow")
        except (HTTPError, ApiException, OSError, ValueError) as err:
            raise unreachable(host, err) from None
        finally:
            retries_log.setLevel(level)


def submit(
    cfg: ExperimentConfig,
    host: str,
    experiment: str | None = None,
    run_name: str | None = None,
    params: list[str] | tuple[str, ...] = (),
    rerun: str | None = None,
    from_run: str | None = None,
    namespace: str | None = None,
) -> str:
    """Compile and submit; returns the run id."""
    with tempfile.TemporaryDirectory(prefix="d2mtl-submit-") as tmp:
        package = compile_module.compile_pipeline(cfg, str(Path(tmp, "pipeline.yaml")))
        arguments = parse_params(list(params), pipeline_parameters(package))
        prefix = arguments.get("publish_prefix", cfg.pipeline.publish_prefix)
        if prefix and not store.is_remote(prefix):
            raise UserError(f"publish prefix {prefix!r}: a cluster run publishes to object storage (s3://bucket/...)")
        reuse = compile_module.plan_rerun(cfg, rerun, from_run, prefix=prefix)
        if reuse is not None:
            compile_module.check_published(cfg, reuse, arguments.get("baseline_tasks", cfg.pipeline.baseline_tasks))
            package = compile_module.compile_pipeline(cfg, package, reuse=reuse)
        client = connect(host, namespace)
        name = run_name or (f"{cfg.name} rerun {rerun} from {from_run}" if reuse else cfg.name)
        result = client.create_run_from_pipeline_package(
            package,
            arguments=arguments,
            run_name=name,
            experiment_name=experiment or cfg.name,
            namespace=namespace,
            enable_caching=cfg.pipeline.caching,
        )
    return result.run_id
