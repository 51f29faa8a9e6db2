"""Teacher stage: one multi-task network trained on every dataset's labels together (2MD-MTL).

With ``cfg.tasks = [age]`` (etc.) the same code trains a single-task baseline of the same
architecture on that task's labelled faces only. Under ``torchrun`` every process runs this function and
trains one data-parallel share (d2mtl.distributed); rank 0 writes ``out``.
"""

from __future__ import annotations

from d2mtl import contracts, distributed
from d2mtl.config.train import TrainConfig
from d2mtl.contracts import Sources
from d2mtl.data import FaceIndex
from d2mtl.engine import Trainer, setup_run
from d2mtl.models import build_model


def run(cfg: TrainConfig, faces: str, labels: str, out: str, restart: bool = False) -> dict:
    """Train on ``faces`` + ``labels`` (URIs), write the model folder to ``out``; returns the results
    (val / test metrics per task, epochs, peak rate, train seconds). Resumes from a checkpoint at ``out`` made
    with the same settings and inputs, unless ``restart``."""
    with distributed.launched(cfg.device) as dist:
        setup_run(cfg)
        index = FaceIndex.load(faces, labels, cfg.task_names)
        role = "teacher" if cfg.tasks is None or len(cfg.task_names) > 1 else f"baseline:{cfg.task_names[0]}"
        sources = Sources(faces=faces, labels=labels)
        trainer = Trainer(
            cfg,
            index,
            out,
            build_model(cfg),
            role=role,
            sources=sources,
            dist=dist,
            inputs={"faces": contracts.content_hash(faces), "labels": contracts.content_hash(labels)},
        )
        return trainer.fit(restart)
