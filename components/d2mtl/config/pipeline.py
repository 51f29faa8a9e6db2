"""Pipeline config: the KFP wiring, local runs (``d2mtl run``) and cluster submission (``d2mtl submit``).

Images, resources and Kubernetes settings only matter on a cluster; ``kfp.local`` ignores them.
"""

from __future__ import annotations

from importlib import metadata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from d2mtl import layout
from d2mtl.tasks import TASKS, TaskList


def package_version() -> str:
    try:
        return metadata.version("distill-2md-mtl")
    except metadata.PackageNotFoundError:
        return "latest"


class StageImages(BaseModel):
    """Container image of each stage (docker/; each has d2mtl and kfp installed): one field per image key of
    ``layout.STAGES``, and those of the tasks of no stage (utility, serve).

    A key's value is an image name, completed as ``<registry>/<name>:<tag>``, or a full reference (one with a
    ``/``) used as it is.
    """

    model_config = ConfigDict(extra="forbid")

    registry: str = "ghcr.io/distill-2md-mtl"
    tag: str = Field(default_factory=package_version)  # default: the package version
    ingest: str = "d2mtl-ingest"
    teacher: str = "d2mtl-train-cpu"
    pseudolabel: str = "d2mtl-train-cpu"
    student: str = "d2mtl-train-cpu"
    evaluate: str = "d2mtl-train-cpu"
    utility: str = "d2mtl-ingest"  # publish, shard plan, gather: no torch needed
    serve: str = "d2mtl-serve"  # the deploy step, and the predictor of the InferenceService it creates

    def reference(self, key: str) -> str:
        name = getattr(self, key)
        return name if "/" in name else f"{self.registry.rstrip('/')}/{name}:{self.tag}"


class Resources(BaseModel):
    """Kubernetes resources of one stage's pods."""

    model_config = ConfigDict(extra="forbid")

    cpu: str = "1"  # CPU request
    memory: str = "4Gi"  # memory request (and limit)
    gpus: int = Field(0, ge=0)  # accelerators; > 0 also adds the GPU node selector, tolerations and /dev/shm
    timeout_s: int | None = Field(None, ge=1)  # pod deadline; None: no limit


class StageResources(BaseModel):
    """Resources of each stage's pods: one field per resources key of ``layout.STAGES``, and utility (the tasks of
    no stage)."""

    model_config = ConfigDict(extra="forbid")

    ingest: Resources = Field(default_factory=lambda: Resources(cpu="4", memory="8Gi"))
    teacher: Resources = Field(default_factory=lambda: Resources(cpu="4", memory="16Gi"))
    pseudolabel: Resources = Field(default_factory=lambda: Resources(cpu="4", memory="8Gi"))
    student: Resources = Field(default_factory=lambda: Resources(cpu="4", memory="16Gi"))
    evaluate: Resources = Field(default_factory=lambda: Resources(cpu="4", memory="8Gi"))
    utility: Resources = Field(default_factory=lambda: Resources(cpu="500m", memory="1Gi"))

    def of(self, stage: str) -> Resources:
        """The resources of ``stage``'s pods (its key in ``layout.STAGES``)."""
        return getattr(self, layout.STAGES[stage].resources)


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None  # with operator Equal
    effect: Literal["NoExecute", "NoSchedule", "PreferNoSchedule"] | None = "NoSchedule"


class ServingConfig(BaseModel):
    """The KServe InferenceService of the deploy step (``deploy: true``); manifests/serving/ holds the defaults."""

    model_config = ConfigDict(extra="forbid")

    name: str = "d2mtl"  # InferenceService name, also the model's name in its endpoint paths
    namespace: str = ""  # empty: the namespace the pipeline runs in
    service_account: str = "d2mtl-serving"  # its Secret lets KServe's storage initializer read the published model
    cpu: str = "1"  # request and limit of the predictor
    memory: str = "2Gi"
    min_replicas: int = Field(1, ge=0)
    max_batch_size: int = Field(16, ge=1)  # KServe's batcher sends a batch of this many instances at most...
    max_latency_ms: int = Field(50, ge=1)  # ...or what arrived within this many milliseconds
    max_request_mb: float = Field(16.0, gt=0)  # d2mtl serve --max-request-mb


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # what runs
    ingest_shards: int = Field(1, ge=1)  # ingest shards fanned out with dsl.ParallelFor, then merged (= one pass)
    shards: int = Field(1, ge=1)  # pseudo-label shards fanned out with dsl.ParallelFor, then merged
    baselines: bool = False  # train the single-task baselines (one per task, in parallel with the teacher)
    baseline_tasks: TaskList = Field(default_factory=lambda: list(TASKS))  # tasks that get a baseline
    single_distill: bool = False  # distil each baseline into a single-task student (needs baselines)
    confusion_task: str = "expression"  # the student's confusion matrix shown in the KFP UI
    parallelism: int = Field(0, ge=0)  # loop iterations (shards, baselines) at once; 0: no limit (kfp.local: 2)
    # local runs (d2mtl run)
    run_root: str = "./runs"  # kfp.local pipeline root: run folders + the task cache (a local folder)
    # results
    publish_prefix: str = ""  # s3:// (or minio://, or a folder): results copied to <prefix>/<run>/<stage>/...
    # cluster
    images: StageImages = Field(default_factory=StageImages)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: StageResources = Field(default_factory=StageResources)
    accelerator_type: str = "nvidia.com/gpu"  # resource name of the GPUs
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration(key="nvidia.com/gpu")])
    shm_size: str = "2Gi"  # memory-backed /dev/shm of GPU pods (DataLoader workers share batches through it)
    secret_name: str = "d2mtl-object-store"  # Kubernetes Secret holding the object-store keys
    secret_env: dict[str, str] = Field(
        default_factory=lambda: {  # Secret key -> environment variable
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        }
    )
    retries: int = Field(2, ge=0)  # retries of a failed stage pod on a cluster (local runs never retry)
    retry_backoff: str = "60s"  # first retry delay, then multiplied by retry_backoff_factor
    retry_backoff_factor: float = Field(2.0, ge=1.0)
    retry_backoff_max: str = "1h"
    caching: bool = True  # reuse a task's outputs when its inputs, settings and image are unchanged
    # serving
    deploy: bool = False  # last step: create or update the InferenceService serving the published student
    serving: ServingConfig = Field(default_factory=ServingConfig)

    @field_validator("confusion_task")
    @classmethod
    def _classification_task(cls, task: str) -> str:
        if task not in TASKS or TASKS[task].kind != "classification":
            names = [t.name for t in TASKS.values() if t.kind == "classification"]
            raise ValueError(f"confusion_task {task!r} is not a classification task ({', '.join(names)})")
        return task

    @field_validator("run_root")
    @classmethod
    def _local_folder(cls, root: str) -> str:
        if "://" in root:
            raise ValueError(
                f"run_root {root!r} must be a local folder (kfp.local cannot write to object storage); "
                "use publish_prefix for s3://"
            )
        return root

    @model_validator(mode="after")
    def _deploy_needs_a_publish_prefix(self) -> PipelineConfig:
        if self.deploy and not self.publish_prefix:
            raise ValueError("deploy serves the published student: set publish_prefix (s3://...) as well")
        return self

    @model_validator(mode="after")
    def _single_needs_baselines(self) -> PipelineConfig:
        if self.single_distill and not self.baselines:
            raise ValueError("single_distill distils the single-task baselines: set baselines: true as well")
        return self
