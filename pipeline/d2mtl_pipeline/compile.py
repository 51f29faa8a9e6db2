"""``d2mtl compile``: the pipeline as KFP IR YAML, and the ``--rerun STAGE --from-run RUN_ID`` variant.

A rerun on a cluster recomputes STAGE and what depends on it; every other stage's outputs are imported
(``dsl.importer``) from where run RUN_ID published them, ``<publish_prefix>/<RUN_ID>/<stage>/...``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from kfp import compiler

from d2mtl import layout, store
from d2mtl.config import ExperimentConfig
from d2mtl.errors import UserError
from d2mtl_pipeline import pipeline
from d2mtl_pipeline.steps import published_uri

log = logging.getLogger("d2mtl.pipeline")


def compile_pipeline(cfg: ExperimentConfig, out: str, reuse: pipeline.Reuse | None = None) -> str:
    """Write the pipeline's IR YAML to ``out`` (a local path, its folders created, or s3://); returns ``out``."""
    if not out.endswith((".yaml", ".yml")):
        raise UserError(f"--out {out}: the compiled pipeline is a YAML file; name it *.yaml")
    with tempfile.TemporaryDirectory(prefix="d2mtl-compile-") as tmp:
        package = Path(tmp, "pipeline.yaml")
        compiler.Compiler().compile(pipeline.build(cfg, reuse=reuse), package_path=str(package))
        store.write_bytes(out, package.read_bytes())
    return out


def plan_rerun(
    cfg: ExperimentConfig, stage: str | None, from_run: str | None, prefix: str | None = None
) -> pipeline.Reuse | None:
    """The ``Reuse`` of ``--rerun STAGE --from-run RUN_ID`` (None without them); ``prefix`` defaults to the
    config's publish prefix."""
    if stage is None and from_run is None:
        return None
    if stage is None or from_run is None:
        raise UserError("--rerun STAGE and --from-run RUN_ID go together: rerun STAGE of run RUN_ID on the cluster")
    pipeline.check_stage(stage, cfg.pipeline)
    prefix = prefix or cfg.pipeline.publish_prefix
    if not prefix:
        raise UserError(
            "--from-run imports what that run published: set the prefix it published to "
            "(--set pipeline.publish_prefix=s3://... or --param publish_prefix=s3://...)"
        )
    return pipeline.Reuse(prefix=prefix, run_id=from_run, stage=stage)


def imported_objects(cfg: ExperimentConfig, reuse: pipeline.Reuse, tasks: list[str]) -> list[str]:
    """The published files a rerun imports: the markers (``layout.STAGES``) of every stage it does not recompute
    (per-task stages once per task in ``tasks``)."""
    stages = pipeline.enabled_stages(cfg.pipeline)
    computed = reuse.computed(stages)
    uris = []
    for name in stages:
        stage = layout.STAGES[name]
        if name in computed:
            continue
        folders = (
            [published_uri(reuse.prefix, reuse.run_id, name, task) for task in tasks]
            if stage.per_task
            else [published_uri(reuse.prefix, reuse.run_id, name, "")]
        )
        uris += [store.join(folder, marker) for folder in folders for marker in stage.markers]
    return uris


def check_published(cfg: ExperimentConfig, reuse: pipeline.Reuse, tasks: list[str]) -> None:
    """Refuse a rerun whose imports are missing; only warn when the store cannot be reached from here."""
    try:
        missing = [uri for uri in imported_objects(cfg, reuse, tasks) if not store.exists(uri)]
    except store.StoreError as err:
        log.warning("could not check run %s's published outputs from here: %s", reuse.run_id, err)
        return
    if missing:
        raise UserError(
            f"run {reuse.run_id} has not published what a rerun of {reuse.stage} imports "
            f"(under {reuse.prefix}): missing {', '.join(missing)}"
        )
