"""The Distill-2MD-MTL pipeline (KFP v2): the DAG of stages, wiring only.

    ingest shards ──> merge ──┬──> teacher ──> pseudo-label shards ──> merge ──> student ──────────┐
    (ParallelFor)             │                 (ParallelFor)                                      ├──> evaluate
                              └──> baselines ──> pseudolabel_single ──> student_single ────────────┘
                                   (each a ParallelFor over the tasks, gathered into <stage>/<task>/ folders;
                                   when pipeline.baselines / pipeline.single_distill are on)

In holdout mode (pseudolabel.holdout.fraction > 0) a holdout step first hides some known labels from the teacher
and the baselines, so the pseudo-label report can measure the pseudo-labels against them.
Every artifact is also copied to ``<publish_prefix>/<run>/<stage>/...`` when a publish prefix is given; with
``pipeline.deploy`` a last step then serves the published student behind a KServe InferenceService (d2mtl.deploy).
The stages, what each reads, its image and resources keys and its switch are the rows of ``layout.STAGES``.
``build(cfg)`` returns the ``@dsl.pipeline`` for an experiment: the stage configs are the defaults of its
parameters, the images and resources come from the ``pipeline`` section. ``Reuse`` turns the stages that a
``--rerun`` does not recompute into ``dsl.importer`` tasks over an earlier run's published artifacts.

No ``from __future__ import annotations`` here: KFP reads the pipeline function's annotations at definition time.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Model

from d2mtl import layout
from d2mtl.config import ExperimentConfig, PipelineConfig
from d2mtl.errors import UserError
from d2mtl.store import StoreSettings
from d2mtl_pipeline import components
from d2mtl_pipeline.placement import Placement
from d2mtl_pipeline.steps import published_uri

PIPELINE_NAME = "distill-2md-mtl"


class Outputs(NamedTuple):
    model: Model  # the final model: the student
    report: HTML  # the evaluation report
    evaluation: Artifact  # everything evaluate wrote (report.html, metrics.json, claims.json, confusion/)


def enabled_stages(cfg: PipelineConfig) -> tuple[str, ...]:
    """The stages of ``layout.STAGES`` whose switch (if any) is on in ``cfg``, in topological order."""
    return tuple(name for name, stage in layout.STAGES.items() if stage.switch is None or getattr(cfg, stage.switch))


def check_stage(stage: str, cfg: PipelineConfig) -> None:
    """A stage that this pipeline runs, else a UserError naming those it does."""
    stages = enabled_stages(cfg)
    if stage not in stages:
        switches = " / ".join(dict.fromkeys(s.switch for s in layout.STAGES.values() if s.switch))
        why = f" ({switches} are off in the pipeline config)" if stage in layout.STAGES else ""
        raise UserError(f"no stage {stage!r} in this pipeline{why}; stages: {', '.join(stages)}")


def downstream(stage: str, stages: tuple[str, ...]) -> frozenset[str]:
    """``stage`` and every enabled stage that reads its outputs, directly or not."""
    found = {stage}
    for name in stages:  # layout.STAGES is in topological order
        if any(parent in found for parent in layout.STAGES[name].upstream):
            found.add(name)
    return frozenset(found & set(stages))


@dataclass(frozen=True)
class Reuse:
    """Recompute ``stage`` and what depends on it; import every other stage's outputs from run ``run_id``
    published at ``prefix``."""

    prefix: str
    run_id: str
    stage: str

    def computed(self, stages: tuple[str, ...]) -> frozenset[str]:
        return downstream(self.stage, stages)


def store_parameter(settings: StoreSettings) -> str:
    """The store settings a component gets: never the keys (a Kubernetes Secret provides those)."""
    return settings.model_dump_json(exclude={"access_key", "secret_key"})


def build(
    cfg: ExperimentConfig,
    reuse: Reuse | None = None,
    local: bool = False,
    rerun_tokens: Mapping[str, str] | None = None,
):
    """The pipeline for ``cfg``; ``local``: for kfp.local (no retries); ``rerun_tokens``: see local.py."""
    p = cfg.pipeline
    c = components.build(p.images)
    stages = enabled_stages(p)
    computed = frozenset(stages) if reuse is None else reuse.computed(stages)
    place = Placement(
        p, local=local, rerun_tokens=dict(rerun_tokens or {}), fresh=frozenset({reuse.stage}) if reuse else frozenset()
    )
    res = p.resources
    pseudolabel_cpu = res.of("pseudolabel").model_copy(update={"gpus": 0})  # label-table work in the pseudolabel image
    holdout = cfg.pseudolabel.holdout.fraction > 0
    loop_limit = p.parallelism or None

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Distill-2MD-MTL: one network for age, gender, race and expression from disjointly "
        "labelled face datasets, by data distillation (arXiv 1907.03402).",
    )
    def distill_2md_mtl(
        ingest_config: str = cfg.ingest.model_dump_json(),
        teacher_config: str = cfg.teacher.model_dump_json(),
        pseudolabel_config: str = cfg.pseudolabel.model_dump_json(),
        student_config: str = cfg.student.model_dump_json(),
        evaluate_config: str = cfg.evaluate.model_dump_json(),
        store: str = store_parameter(cfg.store),
        ingest_shards: int = p.ingest_shards,
        shards: int = p.shards,
        baseline_tasks: list = list(p.baseline_tasks),  # noqa: B006 (KFP reads the parameter's default from here)
        confusion_task: str = p.confusion_task,
        publish_prefix: str = p.publish_prefix,
        run_id: str = "",
    ) -> Outputs:
        """Distill-2MD-MTL.

        Args:
            ingest_config: the ingest section of the experiment (IngestConfig JSON): data root, datasets, splits.
            teacher_config: the teacher section (TrainConfig JSON); the single-task baselines use it too.
            pseudolabel_config: the pseudolabel section (PseudoLabelConfig JSON): transforms, selection rules.
            student_config: the student section (StudentConfig JSON); the single-task students use it too.
            evaluate_config: the evaluate section (EvaluateConfig JSON).
            store: object-store settings (StoreSettings JSON without keys; the keys come from the Secret).
            ingest_shards: how many ingest shards run in parallel before the merge (the tables are those of one pass).
            shards: how many pseudo-label shards run in parallel before the merge.
            baseline_tasks: the tasks that get a single-task baseline (when the pipeline trains baselines).
            confusion_task: the task whose student confusion matrix the KFP UI shows.
            publish_prefix: copy every artifact to <publish_prefix>/<run>/<stage>/...; empty: publish nothing.
            run_id: the <run> part of the published layout; empty: the KFP run id.
        """

        def publish(artifact, stage: str, name="", then=None):
            """Copy ``artifact`` to the published layout; ``then(uri)`` adds tasks that use where it went."""
            with dsl.If(publish_prefix != "", name=f"publish-{stage}"):
                task = place(
                    c.publish(
                        store=store,
                        source=artifact,
                        prefix=publish_prefix,
                        run=run_id,
                        job=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                        stage=stage,
                        name=name,
                    ),
                    "publish",
                    res.utility,
                    cache=False,
                )
                if then is not None:
                    then(task.output)

        def stage_outputs(stage: str, compute, **outputs: tuple[str, type]) -> list:
            """The ``outputs`` of the task ``compute()`` adds when this run computes ``stage``; else what an earlier
            run published of them, each ``output=(its name inside the stage folder, artifact class)`` imported."""
            if stage in computed:
                task = compute()
                return [task.outputs[output] for output in outputs]
            return [
                dsl.importer(
                    artifact_uri=published_uri(reuse.prefix, reuse.run_id, stage, name),
                    artifact_class=kind,
                    reimport=False,
                ).output
                for name, kind in outputs.values()
            ]

        def per_task(stage: str, make, output: str, gather, kind: type):
            """``make(task)`` for every task of baseline_tasks in parallel, gathered into <task>/ folders (or what an
            earlier run published for the stage), published."""

            def loop():
                with dsl.ParallelFor(baseline_tasks, name=stage.replace("_", "-"), parallelism=loop_limit) as task:
                    each = place(make(task), stage, res.of(stage))
                return place(gather(items=dsl.Collected(each.outputs[output])), stage, res.utility)

            (folder,) = stage_outputs(stage, loop, folder=("", kind))
            publish(folder, stage)
            return folder

        # ---- ingest: datasets -> face table + label table, sharded, then merged ---------------------------
        def ingest():
            plan = place(c.shard_plan(shards=ingest_shards), "ingest", res.utility)
            with dsl.ParallelFor(plan.output, name="ingest-shards", parallelism=loop_limit) as shard:
                part = place(
                    c.ingest_shard(config=ingest_config, store=store, shard=shard, shards=ingest_shards),
                    "ingest",
                    res.of("ingest"),
                )
            merge = place(c.ingest_merge(parts=dsl.Collected(part.outputs["part"])), "ingest", res.of("ingest"))
            publish(merge.outputs["report"], "ingest", layout.INGEST_REPORT_MD)
            return merge

        faces, labels = stage_outputs(
            "ingest", ingest, faces=(layout.FACES_DIR, Dataset), labels=(layout.LABELS_FILE, Dataset)
        )
        publish(faces, "ingest", layout.FACES_DIR)
        publish(labels, "ingest", layout.LABELS_FILE)

        # ---- holdout (pseudolabel.holdout.fraction > 0): the teachers train without some known labels --
        teacher_labels = labels
        if holdout and {"teacher", "baselines"} & computed:
            hide = place(c.holdout(config=pseudolabel_config, faces=faces, labels=labels), "teacher", pseudolabel_cpu)
            teacher_labels = hide.outputs["train_labels"]

        # ---- teacher: one multi-task network on every dataset, losses masked where labels are missing --
        (teacher_model,) = stage_outputs(
            "teacher",
            lambda: place(
                c.teacher(config=teacher_config, faces=faces, labels=teacher_labels), "teacher", res.of("teacher")
            ),
            model=("", Model),
        )
        publish(teacher_model, "teacher")

        # ---- pseudo-label: the teacher labels what each dataset lacks, sharded, then merged -------------
        def pseudolabel():
            plan = place(c.shard_plan(shards=shards), "pseudolabel", res.utility)
            with dsl.ParallelFor(plan.output, name="pseudolabel-shards", parallelism=loop_limit) as shard:
                predicted = place(
                    c.pseudolabel_shard(
                        config=pseudolabel_config,
                        teacher=teacher_model,
                        faces=faces,
                        labels=labels,
                        shard=shard,
                        shards=shards,
                    ),
                    "pseudolabel",
                    res.of("pseudolabel"),
                )
            return place(
                c.pseudolabel_merge(config=pseudolabel_config, parts=dsl.Collected(predicted.outputs["part"])),
                "pseudolabel",
                pseudolabel_cpu,
            )

        (pseudo,) = stage_outputs("pseudolabel", pseudolabel, pseudo=("", Dataset))
        publish(pseudo, "pseudolabel")

        # ---- student: ground truth + kept pseudo-labels -> the final model -------------------------------
        (student_model,) = stage_outputs(
            "student",
            lambda: place(
                c.student(config=student_config, faces=faces, labels=labels, pseudo=pseudo, teacher=teacher_model),
                "student",
                res.of("student"),
            ),
            model=("", Model),
        )

        # ---- baselines: the teacher's recipe on one task each, in parallel; gathered as baselines/<task>/ --
        optional = {}
        if "baselines" in stages:
            baselines = optional["baselines"] = per_task(
                "baselines",
                lambda task: c.baseline(config=teacher_config, task=task, faces=faces, labels=teacher_labels),
                "model",
                c.gather_models,
                Model,
            )

        # ---- single-task distillation: each baseline pseudo-labels its task, a single-task student learns it -
        if "student_single" in stages:
            single_pseudo = per_task(
                "pseudolabel_single",
                lambda task: c.pseudolabel_single(
                    config=pseudolabel_config, baselines=baselines, task=task, faces=faces, labels=labels
                ),
                "pseudo",
                c.gather_pseudo,
                Dataset,
            )
            optional["single_students"] = per_task(
                "student_single",
                lambda task: c.student_single(
                    config=student_config,
                    task=task,
                    faces=faces,
                    labels=labels,
                    pseudo=single_pseudo,
                    baselines=baselines,
                ),
                "model",
                c.gather_models,
                Model,
            )

        # ---- evaluate: every model per task x dataset x split, fairness audit, the paper's claims --------
        if holdout:
            optional["pseudo"] = pseudo
        evaluate = place(
            c.evaluate(
                config=evaluate_config,
                confusion_task=confusion_task,
                faces=faces,
                labels=labels,
                teacher=teacher_model,
                student=student_model,
                **optional,
            ),
            "evaluate",
            res.of("evaluate"),
        )
        publish(evaluate.outputs["evaluation"], "evaluate")

        # ---- deploy (pipeline.deploy): the published student behind a KServe InferenceService ------------
        def deploy(model_uri):
            place(
                c.deploy(serving=p.serving.model_dump_json(), image=p.images.reference("serve"), model=model_uri),
                "deploy",
                res.utility,
                cache=False,
            ).after(evaluate)

        publish(student_model, "student", then=deploy if p.deploy else None)
        return Outputs(
            model=student_model, report=evaluate.outputs["report"], evaluation=evaluate.outputs["evaluation"]
        )

    return distill_2md_mtl
