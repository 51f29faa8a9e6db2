"""Student stage: the teacher's training code on ground truth + the kept pseudo-labels (data distillation).

Pseudo-labels (contracts.PSEUDO_SCHEMA) fill only labels the ground truth lacks, and only on train
faces: ground truth always wins, and validation / test stay ground truth. Each pseudo-label's loss is
scaled by ``pseudo_weight`` and, with ``confidence_weighting``, by the teacher's confidence. With
``targets: soft`` a classification pseudo-label trains by KL to the teacher's probabilities and an age
pseudo-label through the band age +- the teacher's spread; ``hard`` uses the label / expected age.
Under ``torchrun`` it trains data-parallel as the teacher does.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from d2mtl import contracts, distributed
from d2mtl.config.train import StudentConfig
from d2mtl.contracts import PseudoLabelUse, Sources
from d2mtl.data import FaceIndex, column_at, positions_in, values_at
from d2mtl.engine import Trainer, setup_run
from d2mtl.errors import UserError
from d2mtl.models import MultiTaskNet, build_model, load_model
from d2mtl.tasks import TASKS


def _probabilities(table: pa.Table, task: str, positions: np.ndarray) -> np.ndarray:
    """(len(positions), C) teacher probabilities of ``task`` at ``positions`` (all >= 0)."""
    probs = column_at(table, f"{task}_probs", positions).to_pylist()
    if any(p is None for p in probs):
        raise contracts.ContractError(f"pseudo table: a kept {task} pseudo-label has no {task}_probs")
    return np.asarray(probs, np.float32).reshape(len(positions), TASKS[task].num_classes)


def apply_pseudo_labels(index: FaceIndex, pseudo: pa.Table, rows: np.ndarray, cfg: StudentConfig) -> dict:
    """Write the kept pseudo-labels of ``rows`` into ``index.targets`` where the ground truth has no label.

    Returns per task: pseudo-labels used, and kept ones ignored because the ground truth has the label.
    """
    positions = positions_in(pa.array(index.sample_id[rows].tolist(), pa.string()), pseudo, where="pseudo table")
    report = {}
    for task in index.tasks:
        targets = index.targets
        kept = values_at(pseudo, f"{task}_kept", positions, False).astype(bool) & (positions >= 0)
        has_truth = targets[f"{task}_weight"][rows] > 0
        use = kept & ~has_truth
        chosen = rows[use]
        weight = np.full(len(chosen), cfg.pseudo_weight, np.float32)
        if TASKS[task].kind == "classification":
            targets[task][chosen] = values_at(pseudo, task, positions, -1)[use]
            if cfg.targets == "soft":
                targets[f"{task}_probs"][chosen] = _probabilities(pseudo, task, positions[use])
                targets[f"{task}_soft"][chosen] = True
            if cfg.confidence_weighting:
                weight *= values_at(pseudo, f"{task}_confidence", positions, 0.0)[use].astype(np.float32)
        else:
            age = values_at(pseudo, task, positions, np.nan)[use].astype(np.float32)
            band = (
                values_at(pseudo, f"{task}_spread", positions, 0.0)[use].astype(np.float32)
                if cfg.targets == "soft"
                else 0.0
            )
            targets[f"{task}_low"][chosen], targets[f"{task}_high"][chosen] = age - band, age + band
        targets[f"{task}_weight"][chosen] = weight
        report[task] = {"used": int(use.sum()), "ignored_ground_truth": int((kept & has_truth).sum())}
    return report


def initial_network(cfg: StudentConfig, teacher: str | None) -> MultiTaskNet:
    """The student's starting point: ImageNet backbone, random, or the teacher's weights."""
    if cfg.init == "scratch":
        return build_model(cfg, weights="none")
    if cfg.init == "imagenet":
        return build_model(cfg)
    if not teacher:
        raise UserError("student init: teacher needs the teacher model folder (--teacher)")
    teacher_net, card = load_model(teacher, tasks=cfg.task_names)
    if (card.backbone, card.age_head) != (cfg.model.backbone, cfg.model.age_head):
        raise UserError(
            f"student init: teacher {teacher} is a {card.backbone} with a {card.age_head} age head; "
            f"the student config asks for {cfg.model.backbone} with {cfg.model.age_head}"
        )
    net = build_model(cfg, weights="none")
    net.load_state_dict(teacher_net.state_dict())
    return net


def check_pseudo_fits(index: FaceIndex, pseudo: pa.Table, where: str) -> None:
    """Refuse a pseudo-label table made from another face table: d2mtl pseudolabel writes a row for every face."""
    matched = int((positions_in(pa.array(index.sample_id.tolist(), pa.string()), pseudo, where=where) >= 0).sum())
    problem = contracts.mismatch(index.faces, where, len(index), pseudo.num_rows, matched)
    if problem:
        raise UserError(f"{problem}; pseudo-label these faces first (d2mtl pseudolabel --faces {index.faces} ...)")


def run(
    cfg: StudentConfig,
    faces: str,
    labels: str,
    pseudo: str,
    out: str,
    teacher: str | None = None,
    restart: bool = False,
) -> dict:
    """Train the student on ``faces`` + ``labels`` + the pseudo-label table ``pseudo``; write the model folder
    to ``out`` and return the results (as the teacher stage, plus the pseudo-labels used per task)."""
    with distributed.launched(cfg.device) as dist:
        setup_run(cfg)
        index = FaceIndex.load(faces, labels, cfg.task_names)
        pseudo_table = contracts.read_table(pseudo, contracts.PSEUDO)
        check_pseudo_fits(index, pseudo_table, f"pseudo table {pseudo}")
        used = apply_pseudo_labels(index, pseudo_table, np.flatnonzero(index.split == "train"), cfg)
        role = "student" if len(cfg.task_names) > 1 else f"student_single:{cfg.task_names[0]}"
        inputs = {"faces": faces, "labels": labels, "pseudo": pseudo}
        trainer = Trainer(
            cfg,
            index,
            out,
            initial_network(cfg, teacher),
            role=role,
            dist=dist,
            sources=Sources(**inputs, teacher=teacher),
            pseudo_labels={task: PseudoLabelUse(**counts) for task, counts in used.items()},
            inputs={name: contracts.content_hash(uri) for name, uri in inputs.items()},
        )
        result = trainer.fit(restart)
    result["pseudo_labels"] = used
    return result
