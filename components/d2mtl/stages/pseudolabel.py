"""The pseudo-label stage (data distillation): the teacher fills in the labels each dataset lacks.

``run`` streams one shard of the face table through the teacher(s) -- every configured transform of a batch
in one pass per input size, several teachers as an ensemble -- and writes the aggregated predictions with the
labels of record as a part table (``contracts.PSEUDO_PART``). ``merge`` concatenates the parts in sample-id
order and selects the pseudo-labels over all of them at once (the prior rule needs every candidate), so a
sharded run merged equals a single run. With one shard, ``run`` merges by itself. Rerunning ``merge`` on the
same parts with other rules re-selects without running the teacher again.

Outputs under ``out`` (names from ``layout``): ``pseudo.parquet`` (``contracts.PSEUDO``), ``report.json``
(retention per task x dataset x class, thresholds used, holdout curves), ``holdout_curves.png`` in holdout
mode, and ``shards/shard-<i>-of-<n>.parquet`` (the parts).

Holdout mode (``holdout.fraction > 0``): ``write_holdout_labels`` hides a fraction of the known labels for the
teacher to train on; this stage hides the same ones (``distill.hide_labels`` is deterministic), treats them
as unlabelled and reports the pseudo-labels' accuracy / MAE against them as the selection parameter sweeps.
The faces of evaluation-only datasets (``use: evaluate`` at ingest) are unlabelled here too: they get
pseudo-labels, and their real labels give the same curves for that target domain (``by_dataset``), with or
without holdout mode.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from d2mtl import contracts, data, distill, layout, plots, store
from d2mtl.config.pseudolabel import RULE_PARAMETER, RULES_BY_KIND, PseudoLabelConfig, TaskRule, parse_transform
from d2mtl.contracts import ModelCard
from d2mtl.devices import resolve_device, use_threads
from d2mtl.errors import UserError
from d2mtl.models import MultiTaskNet, load_model
from d2mtl.tasks import TASKS

log = logging.getLogger(__name__)

AGE_BAND = 10  # years per age band in the retention report


# ---- teachers and transforms --------------------------------------------------------------------


@dataclass
class Teacher:
    uri: str
    net: MultiTaskNet
    card: ModelCard

    def identity(self) -> dict:
        return {"uri": self.uri, **self.card.identity()}


def load_teachers(uris: list[str], tasks: tuple[str, ...], device: torch.device) -> list[Teacher]:
    """Load the ensemble, refusing a teacher whose tasks are not exactly ``tasks``."""
    if not uris:
        raise UserError("pseudolabel needs at least one teacher model folder")
    for uri in uris:
        found = contracts.read_model_card(uri).tasks
        if set(found) != set(tasks):
            raise UserError(
                f"teacher {uri} predicts {', '.join(found)} but pseudolabel.tasks is "
                f"{', '.join(tasks)}; configure the teacher's tasks (pseudolabel.tasks, or "
                f"--tasks {','.join(found)} on the command line) or pick another teacher"
            )
    return [Teacher(uri, *load_model(uri, device)) for uri in uris]


def _crop(x: torch.Tensor, factor: float) -> torch.Tensor:
    size = list(x.shape[-2:])
    return F.resize(F.center_crop(x, [max(1, round(factor * s)) for s in size]), size, antialias=True)


def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.resize(x, [max(1, round(factor * s)) for s in x.shape[-2:]], antialias=True)


OPS = {"identity": lambda x, factor: x, "hflip": lambda x, factor: F.horizontal_flip(x), "crop": _crop, "scale": _scale}


def make_views(x: torch.Tensor, transforms: list[str]) -> list[torch.Tensor]:
    """Each transform ("crop:0.9+hflip") applied to the whole batch (B, 3, H, W); transforms that start with
    the same ops share them ("crop:0.9" and "crop:0.9+hflip" crop once)."""
    done: dict[tuple, torch.Tensor] = {(): x}
    views = []
    for spec in transforms:
        ops = tuple(parse_transform(spec))
        for end in range(1, len(ops) + 1):
            if ops[:end] not in done:
                name, factor = ops[end - 1]
                done[ops[:end]] = OPS[name](done[ops[: end - 1]], factor)
        views.append(done[ops])
    return views


def predict_members(
    teachers: list[Teacher], images: torch.Tensor, transforms: list[str], device: torch.device
) -> dict[str, np.ndarray]:
    """Every (teacher, transform) member's prediction of a uint8 batch (B, 3, H, W).

    Returns per classification task (M, B, C) probabilities and for age (M, B) expected years, M = teachers x
    transforms. Views of one size go through the network together.
    """
    members: dict[str, list[torch.Tensor]] = {}
    images = images.to(device)
    for teacher in teachers:
        resized = data.eval_transform(teacher.card.input_size)(images)
        x = data.normalize(resized, teacher.card.mean, teacher.card.std, device)  # (B, 3, S, S)
        views = make_views(x, transforms)
        outputs: list[dict[str, torch.Tensor] | None] = [None] * len(views)
        for shape in dict.fromkeys(v.shape for v in views):
            chosen = [i for i, v in enumerate(views) if v.shape == shape]
            predicted = teacher.net.predict(torch.cat([views[i] for i in chosen]))
            for k, i in enumerate(chosen):
                outputs[i] = {task: value[k * len(x) : (k + 1) * len(x)] for task, value in predicted.items()}
        for output in outputs:
            for task in teacher.card.tasks:
                members.setdefault(task, []).append(output[task])
    return {task: torch.stack(values).float().cpu().numpy() for task, values in members.items()}


# ---- inference over a shard ---------------------------------------------------------------------


class FaceBatches(torch.utils.data.IterableDataset):
    """Decoded batches of some face-table shards: {"sample_id", "dataset", "images" uint8 (B, 3, H, W)}.

    Batches never span face shards, so a face meets the same batch mates whatever the sharding. DataLoader
    workers split the shards between them.
    """

    def __init__(self, faces: str, shards: list[str], batch_size: int):
        self.faces, self.shards, self.batch_size = faces, shards, batch_size

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        shards = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for batch in contracts.iter_face_batches(
            self.faces, columns=["sample_id", "dataset", "image"], shards=shards, batch_rows=self.batch_size
        ):
            ids = batch.column("sample_id").to_pylist()
            images = []
            for sample_id, jpeg in zip(ids, batch.column("image").to_pylist(), strict=True):
                try:
                    images.append(data.decode_jpeg(jpeg))
                except UserError as err:
                    raise UserError(f"{self.faces}: face {sample_id}: {err}; re-run ingest") from None
            if len({tuple(image.shape) for image in images}) > 1:  # the contract says one size; tolerate mixed
                side = max(image.shape[-1] for image in images)
                images = [data.eval_transform(side)(image) for image in images]
            yield {"sample_id": ids, "dataset": batch.column("dataset").to_pylist(), "images": torch.stack(images)}


def infer(
    teachers: list[Teacher], faces: str, shards: list[str], cfg: PseudoLabelConfig, device: torch.device, rows: int
) -> tuple[pa.Table, dict[str, distill.TaskPrediction]]:
    """Aggregated predictions for every face in ``shards``: (sample_id + dataset, task -> prediction).

    ``cfg.workers`` processes read and decode while the network runs. Each batch is aggregated as it comes
    (rows are independent), so memory holds no per-member outputs.
    """
    loader = torch.utils.data.DataLoader(
        FaceBatches(faces, shards, cfg.batch_size),
        batch_size=None,
        num_workers=cfg.workers,
        prefetch_factor=2 if cfg.workers else None,
        pin_memory=device.type == "cuda",
    )
    ids, datasets, chunks = [], [], {}
    with tqdm(total=rows, unit="face", desc="pseudo-label", mininterval=10) as progress:
        for batch in loader:
            ids += batch["sample_id"]
            datasets += batch["dataset"]
            for task, values in predict_members(teachers, batch["images"], cfg.transforms, device).items():
                chunks.setdefault(task, []).append(_aggregate(task, values))
            progress.update(len(batch["sample_id"]))
    keys = pa.table({"sample_id": pa.array(ids, pa.string()), "dataset": pa.array(datasets, pa.string())})
    predictions = {}
    for task in teachers[0].card.tasks:
        no_rows = (1, 0, TASKS[task].num_classes) if TASKS[task].kind == "classification" else (1, 0)
        predictions[task] = distill.concatenate(chunks.get(task) or [_aggregate(task, np.zeros(no_rows))])
    return keys, predictions


def _aggregate(task: str, values: np.ndarray) -> distill.TaskPrediction:
    if TASKS[task].kind == "classification":
        return distill.aggregate_classification(values)
    return distill.aggregate_regression(values)


# ---- labels of record and hidden truth ----------------------------------------------------------


def labels_of_record(
    cfg: PseudoLabelConfig, faces: str, labels: pa.Table
) -> tuple[pa.Table, pa.Table | None, pa.Table | None]:
    """(the labels the teacher trained on, the labels hidden in holdout mode or None, the labels of the
    evaluation-only datasets or None: their faces are an unlabelled domain here)."""
    record, evaluation_truth = contracts.training_labels(faces, labels)
    if cfg.holdout.fraction == 0:
        return record, None, evaluation_truth
    record, hidden = distill.hide_labels(record, cfg.holdout.fraction, cfg.holdout.tasks, cfg.holdout.seed)
    return record, hidden, evaluation_truth


def check_holdout_teachers(cfg: PseudoLabelConfig, teachers: list[Teacher]) -> None:
    """Refuse a teacher whose card says it trained on labels that do not hide this holdout's labels.

    A card without readable training sources (e.g. a pipeline artifact of another pod) only gets a warning.
    """
    expected = cfg.holdout.model_dump_json(include={"fraction", "tasks", "seed"})
    for teacher in teachers:
        labels = teacher.card.sources.labels if teacher.card.sources else None
        try:
            found = contracts.table_metadata(labels).get(contracts.HOLDOUT_KEY) if labels else None
        except (FileNotFoundError, UserError):
            found = "unreadable"
        if found == "unreadable" or labels is None:
            log.warning(
                "cannot check that teacher %s was trained without the hidden labels (its labels: %s)",
                teacher.uri,
                labels,
            )
        elif found != expected:
            raise UserError(
                f"holdout mode: teacher {teacher.uri} was trained on {labels}, which does not hide "
                f"these labels ({found or 'nothing hidden'} vs {expected}); train it on the labels "
                "written by `d2mtl pseudolabel --hide-labels` with the same holdout settings"
            )


def label_columns(keys: pa.Table, record: pa.Table, hidden: pa.Table | None) -> dict[str, pa.Array]:
    """Per task ``<task>_known`` and ``<task>_hidden`` for the rows of ``keys``."""
    positions = data.positions_in(keys.column("sample_id"), record, where="label table")
    hidden_positions = (
        data.positions_in(keys.column("sample_id"), hidden, where="hidden truth") if hidden is not None else None
    )
    columns = {}
    for task in TASKS.values():
        if task.kind == "classification":
            columns[f"{task.name}_known"] = data.column_at(record, task.name, positions)
        else:  # an exact value or an interval (age groups) is a label of record
            interval = pc.and_(
                data.column_at(record, f"{task.name}_low", positions).is_valid(),
                data.column_at(record, f"{task.name}_high", positions).is_valid(),
            )
            columns[f"{task.name}_known"] = pc.or_(data.column_at(record, task.name, positions).is_valid(), interval)
        if hidden_positions is not None:
            columns[f"{task.name}_hidden"] = data.column_at(hidden, task.name, hidden_positions)
    return columns


# ---- tables -------------------------------------------------------------------------------------


def _prediction_columns(predictions: dict[str, distill.TaskPrediction]) -> dict[str, pa.Array]:
    columns = {}
    for name, pred in predictions.items():
        if TASKS[name].kind == "classification":
            columns[name] = pa.array(pred.value, pa.int8())
            columns[f"{name}_confidence"] = pa.array(pred.score, pa.float32())
            columns[f"{name}_probs"] = pa.FixedSizeListArray.from_arrays(
                pa.array(pred.probs.reshape(-1), pa.float32()), TASKS[name].num_classes
            )
        else:
            columns[name] = pa.array(pred.value, pa.float32())
            columns[f"{name}_spread"] = pa.array(pred.score, pa.float32())
    return columns


def _table(schema: pa.Schema, rows: int, columns: dict[str, pa.Array]) -> pa.Table:
    """A table of ``schema`` from ``columns``; absent columns are all null."""
    return pa.table(
        {f.name: columns[f.name] if f.name in columns else pa.nulls(rows, f.type) for f in schema}, schema=schema
    )


def _predictions_of(part: pa.Table, task: str) -> distill.TaskPrediction:
    if TASKS[task].kind == "classification":
        probs = part.column(f"{task}_probs").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return distill.TaskPrediction(
            value=_numpy(part, task).astype(np.int64),
            score=_numpy(part, f"{task}_confidence"),
            probs=probs.reshape(part.num_rows, TASKS[task].num_classes),
        )
    return distill.TaskPrediction(value=_numpy(part, task), score=_numpy(part, f"{task}_spread"))


def _numpy(table: pa.Table, column: str) -> np.ndarray:
    """A numeric column as float64, nulls as NaN."""
    return pc.cast(table.column(column), pa.float64()).fill_null(np.nan).to_numpy()


# ---- selection and the report ---------------------------------------------------------------------


def retention_rows(
    task: str, part: pa.Table, pred: distill.TaskPrediction, candidate: np.ndarray, kept: np.ndarray
) -> list[dict]:
    """Candidates and kept pseudo-labels per dataset x predicted class (age: 10-year band), plus "all"."""
    names = TASKS[task].classes
    codes = (pred.value[candidate] if names else pred.value[candidate] // AGE_BAND).astype(np.int64)
    datasets = np.asarray(part.column("dataset").to_pylist(), dtype=object)[candidate]
    kept = kept[candidate]
    rows = []
    for dataset in sorted(set(datasets)):
        in_dataset = datasets == dataset
        groups = [("all", in_dataset)]
        for code in np.unique(codes[in_dataset]):
            label = names[code] if names else f"{code * AGE_BAND}-{code * AGE_BAND + AGE_BAND - 1}"
            groups.append((label, in_dataset & (codes == code)))
        for label, mask in groups:
            total, count = int(mask.sum()), int(kept[mask].sum())
            rows.append(
                {
                    "task": task,
                    "dataset": dataset,
                    "class": label,
                    "candidates": total,
                    "kept": count,
                    "retention": count / total,
                }
            )
    return rows


def quality_curves(
    cfg: PseudoLabelConfig,
    task: str,
    pred: distill.TaskPrediction,
    candidate: np.ndarray,
    known: np.ndarray | None,
    kept: np.ndarray,
    truth: np.ndarray,
) -> dict:
    """The kept pseudo-labels measured on ``truth`` (NaN: no truth), and every applicable rule's sweep."""
    rule = cfg.rule_for(task)
    sweeps = {}
    for name in RULES_BY_KIND[TASKS[task].kind]:
        try:
            curve = distill.holdout_curve(task, name, pred, candidate, known, truth, cfg.holdout.sweep(name))
        except ValueError:  # e.g. the prior rule for a task that no training dataset labels
            continue
        sweeps[name] = {"parameter": distill.CURVE_KEY[name], "curve": curve}
    return {
        "rule": rule.rule,
        **sweeps.pop(rule.rule),
        "chosen": distill.holdout_point(task, kept, pred, truth),
        "other_rules": sweeps,
    }


def select_by_dataset(
    cfg: PseudoLabelConfig,
    task: str,
    datasets: np.ndarray,
    pred: distill.TaskPrediction,
    candidate: np.ndarray,
    known: np.ndarray | None,
) -> distill.Selection:
    """The task's rule over the candidates, except those of datasets with their own rule (``dataset_rules``),
    which are selected by it among themselves; the thresholds of each such dataset go under ``by_dataset``."""
    own_rules = {name: rules[task] for name, rules in cfg.dataset_rules.items() if task in rules}
    rule = cfg.rule_for(task)
    if not own_rules:
        return distill.select(task, rule.rule, rule.parameter, pred, candidate, known)
    others = candidate & ~np.isin(datasets, list(own_rules))
    selection = distill.select(task, rule.rule, rule.parameter, pred, others, known)
    kept, by_dataset = selection.kept.copy(), {}
    for name, own_rule in own_rules.items():
        own = distill.select(task, own_rule.rule, own_rule.parameter, pred, candidate & (datasets == name), known)
        kept |= own.kept
        by_dataset[name] = {"rule": own_rule.rule, **own.thresholds}
    return distill.Selection(kept, {**selection.thresholds, "by_dataset": by_dataset})


def select_all(
    cfg: PseudoLabelConfig, part: pa.Table, tasks: tuple[str, ...], with_truth: bool
) -> tuple[dict[str, pa.Array], dict, list[dict], dict]:
    """Apply every task's rule over the whole (merged) part: kept columns, per-task summary, retention rows,
    holdout curves."""
    kept_columns, summary, retention, curves = {}, {}, [], {}
    datasets = np.asarray(part.column("dataset").to_pylist(), dtype=object)
    for task in tasks:
        pred = _predictions_of(part, task)
        known_column = part.column(f"{task}_known")
        labelled = (
            known_column.to_numpy(zero_copy_only=False).astype(bool)
            if TASKS[task].kind == "regression"
            else known_column.is_valid().to_numpy(zero_copy_only=False)
        )
        candidate = ~labelled  # a label of record is never overwritten
        known = (
            _numpy(part, f"{task}_known")[labelled].astype(np.int64) if TASKS[task].kind == "classification" else None
        )
        try:
            selection = select_by_dataset(cfg, task, datasets, pred, candidate, known)
        except ValueError as err:
            raise UserError(str(err)) from None
        kept_columns[f"{task}_kept"] = pa.array(selection.kept)
        summary[task] = {
            "thresholds": selection.thresholds,
            "labelled": int(labelled.sum()),
            "candidates": int(candidate.sum()),
            "kept": int(selection.kept.sum()),
            "retention": float(selection.kept.sum() / candidate.sum()) if candidate.any() else None,
        }
        retention += retention_rows(task, part, pred, candidate, selection.kept)
        truth = _numpy(part, f"{task}_hidden")
        if with_truth and not np.isnan(truth).all():
            measured = {
                name: quality_curves(
                    cfg, task, pred, candidate, known, selection.kept, np.where(datasets == name, truth, np.nan)
                )
                for name in sorted(set(datasets[~np.isnan(truth)]))
            }
            curves[task] = {
                **quality_curves(cfg, task, pred, candidate, known, selection.kept, truth),
                "by_dataset": measured,
            }
    return kept_columns, summary, retention, curves


# ---- the stage ------------------------------------------------------------------------------------


def run(
    cfg: PseudoLabelConfig, teachers: list[str], faces: str, labels: str, out: str, shard: tuple[int, int] = (0, 1)
) -> dict:
    """Pseudo-label shard ``i`` of ``n`` of the face table (face shards i, i+n, ...) into ``out``.

    Writes ``out/shards/shard-<i>-of-<n>.parquet``; with n == 1 also merges it (pseudo.parquet, report.json).
    """
    index, count = shard
    layout.check_shard(index, count)
    use_threads(cfg.threads)
    device = resolve_device(cfg.device)
    tasks = cfg.task_names
    models = load_teachers(teachers, tasks, device)
    manifest = contracts.read_manifest(faces)
    all_shards = contracts.face_shards(faces)
    mine = all_shards[index::count]
    rows = sum(s["rows"] for s in manifest["shards"][index::count])
    if not mine:
        log.warning("shard %d/%d: the face table has only %d shards, nothing to do", index, count, len(all_shards))
    record, hidden, evaluation_truth = labels_of_record(cfg, faces, contracts.read_table(labels, contracts.LABELS))
    if hidden is not None:
        check_holdout_teachers(cfg, models)
    truths = [t for t in (hidden, evaluation_truth) if t is not None]
    log.info(
        "pseudo-labelling %d faces (shard %d/%d) with %d teacher(s) x %d transforms on %s",
        rows,
        index,
        count,
        len(models),
        len(cfg.transforms),
        device,
    )
    keys, predictions = infer(models, faces, mine, cfg, device, rows)
    columns = {
        "sample_id": keys.column("sample_id").combine_chunks(),
        "dataset": keys.column("dataset").combine_chunks(),
        **_prediction_columns(predictions),
        **label_columns(keys, record, pa.concat_tables(truths) if truths else None),
    }
    part = _table(contracts.PSEUDO_PART_SCHEMA, keys.num_rows, columns).sort_by("sample_id")
    provenance = {
        "teachers": [m.identity() for m in models],
        "transforms": cfg.transforms,
        "tasks": list(tasks),
        "holdout": cfg.holdout.model_dump(include={"fraction", "tasks", "seed"}) if hidden else None,
        "evaluate_only": contracts.evaluate_only_datasets(faces),
        "faces_rows": manifest["rows"],
        "face_shards": len(all_shards),
        "shards": count,
    }
    part_uri = store.join(out, layout.pseudo_shard(index, count))
    contracts.write_table(
        part,
        part_uri,
        contracts.PSEUDO_PART,
        {contracts.PSEUDO_PART_KEY: json.dumps({"shard": index, **provenance}, sort_keys=True)},
    )
    if count == 1:
        return merge(cfg, [part_uri], out)
    return {"part": part_uri, "rows": part.num_rows, "shard": [index, count]}


def _part_files(uri: str) -> list[str]:
    """A part file, or the parts under a shard run's output prefix."""
    if uri.endswith(".parquet"):
        return [uri]
    found = [f for f in store.list_files(store.join(uri, layout.PSEUDO_SHARDS_DIR)) if f.endswith(".parquet")]
    if not found:
        raise UserError(
            f"{uri}: no pseudo-label parts under {layout.PSEUDO_SHARDS_DIR}/ (run pseudolabel --shard first)"
        )
    return found


def read_parts(parts: list[str]) -> tuple[pa.Table, dict]:
    """The parts concatenated in sample-id order and their shared provenance; refuses an incomplete or mixed
    set of shards."""
    if not parts:
        raise UserError("merge needs the shard outputs to merge")
    tables, provenance, seen = [], None, {}
    for uri in [f for item in parts for f in _part_files(item)]:
        try:
            meta = json.loads(contracts.table_metadata(uri)[contracts.PSEUDO_PART_KEY])
        except KeyError:
            raise UserError(f"{uri}: not a pseudo-label part (no {contracts.PSEUDO_PART_KEY} metadata)") from None
        shard = meta.pop("shard")
        if provenance is not None and meta != provenance:
            changed = sorted(k for k in meta if meta[k] != provenance.get(k))
            raise UserError(f"{uri}: part of another run (differs in {', '.join(changed)}); merge parts of one run")
        if shard in seen:
            raise UserError(f"shard {shard} given twice: {seen[shard]} and {uri}")
        provenance, seen[shard] = meta, uri
        tables.append(contracts.read_table(uri, contracts.PSEUDO_PART))
    missing = sorted(set(range(provenance["shards"])) - set(seen))
    if missing:
        raise UserError(
            f"missing shard(s) {', '.join(map(str, missing))} of {provenance['shards']}; merge needs every shard"
        )
    table = pa.concat_tables(tables).sort_by("sample_id")
    if table.num_rows != provenance["faces_rows"]:
        raise UserError(f"the parts hold {table.num_rows} rows, the face table {provenance['faces_rows']}")
    if pc.count_distinct(table.column("sample_id")).as_py() != table.num_rows:
        raise contracts.ContractError("duplicate sample_id values across the parts")
    return table, provenance


def rule_record(rule: TaskRule) -> dict:
    """A rule as the provenance records it: its name and the parameter it uses."""
    return rule.model_dump(include={"rule", RULE_PARAMETER[rule.rule]})


def merge(cfg: PseudoLabelConfig, parts: list[str], out: str) -> dict:
    """Select the pseudo-labels over all parts and write ``pseudo.parquet`` and ``report.json`` under ``out``."""
    part, provenance = read_parts(parts)
    tasks = tuple(provenance["tasks"])
    if set(tasks) != set(cfg.task_names):
        raise UserError(f"the parts predict {', '.join(tasks)} but pseudolabel.tasks is {', '.join(cfg.task_names)}")
    with_truth = provenance["holdout"] is not None or bool(provenance["evaluate_only"])
    kept, summary, retention, curves = select_all(cfg, part, tasks, with_truth)
    nothing = {f"{task}_kept": pa.array(np.zeros(part.num_rows, bool)) for task in TASKS if task not in tasks}
    pseudo = _table(
        contracts.PSEUDO_SCHEMA,
        part.num_rows,
        {**{name: part.column(name) for name in part.column_names}, **kept, **nothing},
    )
    rules = {task: rule_record(cfg.rule_for(task)) for task in tasks}
    dataset_rules = {
        name: {task: rule_record(rule) for task, rule in own.items() if task in tasks}
        for name, own in cfg.dataset_rules.items()
    }
    meta = {
        "teachers": provenance["teachers"],
        "transforms": provenance["transforms"],
        "tasks": list(tasks),
        "rules": rules,
        "dataset_rules": dataset_rules,
        "holdout": provenance["holdout"],
        "evaluate_only": provenance["evaluate_only"],
    }
    pseudo_uri, report_uri = store.join(out, layout.PSEUDO_FILE), store.join(out, layout.PSEUDO_REPORT)
    contracts.write_table(
        pseudo, pseudo_uri, contracts.PSEUDO, {contracts.PSEUDO_PROVENANCE_KEY: json.dumps(meta, sort_keys=True)}
    )
    report = {
        **meta,
        "rows": part.num_rows,
        "shards": provenance["shards"],
        "selection": summary,
        "retention": retention,
    }
    if curves:
        store.write_bytes(store.join(out, layout.PSEUDO_HOLDOUT_PLOT), plots.holdout_curves(curves), "image/png")
        report["holdout"] = {**(provenance["holdout"] or {}), "curves": curves, "plot": layout.PSEUDO_HOLDOUT_PLOT}
    store.write_text(report_uri, json.dumps(report, indent=1))
    log.info(
        "pseudo-labels kept, of the faces without that label: %s",
        ", ".join(f"{t} {s['kept']} of {s['candidates']}" for t, s in summary.items()),
    )
    return {
        "pseudo": pseudo_uri,
        "report": report_uri,
        "rows": part.num_rows,
        "kept": {task: s["kept"] for task, s in summary.items()},
    }


def write_holdout_labels(cfg: PseudoLabelConfig, faces: str, labels: str, out: str) -> dict:
    """Holdout mode, before the teacher: write the label table to train it on and the hidden truth."""
    if cfg.holdout.fraction == 0:
        raise UserError(
            "pseudolabel.holdout.fraction is 0: nothing to hide (e.g. --set pseudolabel.holdout.fraction=0.2)"
        )
    record, hidden, _ = labels_of_record(cfg, faces, contracts.read_table(labels, contracts.LABELS))
    setting = {contracts.HOLDOUT_KEY: cfg.holdout.model_dump_json(include={"fraction", "tasks", "seed"})}
    train_uri, truth_uri = store.join(out, layout.HOLDOUT_LABELS_FILE), store.join(out, layout.HOLDOUT_TRUTH_FILE)
    contracts.write_table(record, train_uri, contracts.LABELS, setting)
    contracts.write_table(hidden, truth_uri, contracts.LABELS, setting)
    counts = {task: hidden.num_rows - hidden.column(task).null_count for task in cfg.holdout.tasks}
    log.info("holdout: hid %s; train the teacher on %s", counts, train_uri)
    return {"labels": train_uri, "hidden_truth": truth_uri, "hidden": counts}
