"""How each task runs on a cluster: resources, GPU nodes, the object-store Secret, retries, caching.

``kfp.local`` ignores all of it (resource settings only warn, kfp-kubernetes settings are dropped), except
retries (which a local run turns off: a failure on one machine repeats) and caching.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kfp import kubernetes
from kfp.dsl import PipelineTask

from d2mtl.config.pipeline import PipelineConfig, Resources

RERUN_ENV = "D2MTL_RERUN"  # a local --rerun token: part of the task's cache key, so the stage recomputes
SHM_VOLUME = "dshm"


@dataclass(frozen=True)
class Placement:
    cfg: PipelineConfig
    local: bool = False  # a kfp.local run: no retries
    rerun_tokens: Mapping[str, str] = field(default_factory=dict)  # stage -> token (see local.py)
    fresh: frozenset[str] = frozenset()  # stages whose tasks never reuse cached results (a cluster --rerun)

    def __call__(self, task: PipelineTask, stage: str, resources: Resources, cache: bool = True) -> PipelineTask:
        """Apply the stage's settings to ``task``; ``stage`` names the stage for --rerun tokens."""
        cfg = self.cfg
        task.set_cpu_request(resources.cpu).set_memory_request(resources.memory).set_memory_limit(resources.memory)
        if resources.gpus:
            task.set_accelerator_type(cfg.accelerator_type).set_accelerator_limit(resources.gpus)
            for key, value in cfg.gpu_node_selector.items():
                kubernetes.add_node_selector(task, key, value)
            for toleration in cfg.gpu_tolerations:
                kubernetes.add_toleration(
                    task,
                    key=toleration.key,
                    operator=toleration.operator,
                    value=toleration.value,
                    effect=toleration.effect,
                )
            kubernetes.empty_dir_mount(
                task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory", size_limit=cfg.shm_size
            )
        if resources.timeout_s:
            kubernetes.set_timeout(task, resources.timeout_s)
        kubernetes.set_image_pull_policy(task, cfg.image_pull_policy)
        kubernetes.use_secret_as_env(task, secret_name=cfg.secret_name, secret_key_to_env=cfg.secret_env)
        if cfg.retries and not self.local:
            task.set_retry(
                num_retries=cfg.retries,
                backoff_duration=cfg.retry_backoff,
                backoff_factor=cfg.retry_backoff_factor,
                backoff_max_duration=cfg.retry_backoff_max,
            )
        task.set_caching_options(cache and cfg.caching and stage not in self.fresh)
        if stage in self.rerun_tokens:
            task.set_env_variable(RERUN_ENV, self.rerun_tokens[stage])
        return task
