"""The evaluate stage: score models on any ingested faces, audit fairness, judge the paper's claims, report.

``run(cfg, models, faces, labels, out)`` reads the face table once, decodes each face once and runs every model
on it (batched, through ``models.load_model`` + ``net.predict`` and ``data``'s eval transform), then scores
each model per task x dataset x split (``metrics``), compares the models (``claims``) and writes, under ``out``
(names from ``layout``):

- ``metrics.json``: flat scalar metrics ``<model>/<task>/<dataset>/<split>/<metric>`` (and fairness gaps) for
  the KFP UI;
- ``claims.json``: the three claims with their numbers, and the comparison table across models;
- ``evaluation.json``: everything (models, per-group rows, gaps, confusion matrices, in-domain coverage, skips);
- ``confusion/<model>_<task>_<dataset>_<split>.png`` + ``.json`` (``{"categories", "matrix"}``, the shape of
  KFP's ``ClassificationMetrics.log_confusion_matrix``);
- ``report.html``: self-contained (``report``).

Datasets never seen in training are evaluated like any other; a model simply has no rows for a task it lacks.
Configured ``views`` add synthetic other-domain copies of datasets (e.g. UTKFace made gray and 48 px).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchvision.transforms.v2 import functional as F

from d2mtl import claims, contracts, data, layout, metrics, plots, report, store
from d2mtl.config.evaluate import DomainView, EvaluateConfig
from d2mtl.contracts import ModelCard
from d2mtl.devices import resolve_device, use_threads
from d2mtl.errors import UserError
from d2mtl.models import load_model
from d2mtl.roles import NO_ROLE, Role, index_roles, parse_role
from d2mtl.tasks import TASKS

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[\w.:-]+$")  # a model name in NAME=URI (no slash, so s3://a/b=c stays one URI)
VIEW_SEPARATOR = "~"  # <dataset>~<view>


@dataclass
class EvalModel:
    name: str
    uri: str
    role: Role | None
    net: torch.nn.Module
    card: ModelCard


@dataclass
class Collected:
    """One row per evaluated face (view copies included) and each model's predictions, in the same order."""

    sample_id: list[str] = field(default_factory=list)
    dataset: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    predictions: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # faces that could not be evaluated, with the reason

    def arrays(self) -> dict[str, dict[str, np.ndarray]]:
        return {
            model: {task: np.concatenate(parts) for task, parts in tasks.items()}
            for model, tasks in self.predictions.items()
        }


# ---- models -------------------------------------------------------------------------------------


def split_model_arg(item: str) -> tuple[str | None, str]:
    """``NAME=URI`` -> (NAME, URI); a bare URI -> (None, URI)."""
    name, sep, uri = item.partition("=")
    if sep and _NAME.match(name) and uri:
        return name, uri
    return None, item


def default_name(uri: str) -> str:
    """The folder name; ``baselines/age`` becomes ``baselines_age``."""
    parts = PurePosixPath(uri.rstrip("/").replace("\\", "/")).parts
    if len(parts) >= 2 and parts[-1] in TASKS:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1] if parts else uri


def role_of(name: str, card_role: str | None, cfg: EvaluateConfig) -> Role | None:
    """From the config's role mapping (``none``: no role), else the model name, else the card's ``role``."""
    if cfg.roles.get(name) == NO_ROLE:
        return None
    for text in (cfg.roles.get(name), name, card_role):
        if text:
            role = parse_role(str(text))
            if role is not None:
                return role
    return None


def load_models(items: list[str], cfg: EvaluateConfig, device: torch.device) -> list[EvalModel]:
    if not items:
        raise UserError("evaluate needs at least one model folder (--models URI[,URI...])")
    loaded: list[EvalModel] = []
    for item in items:
        name, uri = split_model_arg(item)
        net, card = load_model(uri, device)
        name = name or default_name(uri)
        if any(m.name == name for m in loaded):
            raise UserError(f"two models are named {name!r}; name them apart with NAME=URI")
        loaded.append(EvalModel(name, uri, role_of(name, card.role, cfg), net, card))
        log.info("model %s (%s): %s, tasks %s", name, loaded[-1].role or "no role", uri, ", ".join(card.tasks))
    unknown = sorted(set(cfg.roles) - {m.name for m in loaded})
    if unknown:
        raise UserError(
            f"evaluate.roles names model(s) {', '.join(unknown)} that are not among --models "
            f"({', '.join(m.name for m in loaded)})"
        )
    index_roles({m.name: m.role for m in loaded})  # one model per role, checked before any inference
    return loaded


# ---- inference ----------------------------------------------------------------------------------


def apply_view(image: torch.Tensor, view: DomainView) -> torch.Tensor:
    """uint8 (3, H, W) -> the same face in the view's domain, same size."""
    if view.grayscale:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if view.downscale_to is not None:
        size = list(image.shape[-2:])
        image = F.resize(F.resize(image, [view.downscale_to] * 2, antialias=True), size, antialias=True)
    return image


def _resize(images: list[torch.Tensor], size: int) -> torch.Tensor:
    transform = data.eval_transform(size)
    if len({tuple(im.shape) for im in images}) == 1:
        return transform(torch.stack(images))
    return torch.stack([transform(im) for im in images])


def _predict(models: list[EvalModel], images: list[torch.Tensor], device: torch.device, collected: Collected) -> None:
    resized: dict[int, torch.Tensor] = {}
    for model in models:
        size = model.card.input_size
        if size not in resized:
            resized[size] = _resize(images, size)
        outputs = model.net.predict(data.normalize(resized[size], model.card.mean, model.card.std, device))
        store_to = collected.predictions.setdefault(model.name, {})
        for task in model.card.tasks:
            value = outputs[task]
            value = value.argmax(dim=1) if TASKS[task].kind == "classification" else value
            store_to.setdefault(task, []).append(value.cpu().numpy())


def sampled_ids(faces: str, cfg: EvaluateConfig) -> pa.Array | None:
    """With ``max_faces_per_dataset``: the sample ids kept, the lowest ids of each dataset x split (ids are
    hashes, so this is a deterministic random sample, whatever the face-table order); else None (all)."""
    if cfg.max_faces_per_dataset is None:
        return None
    meta = contracts.read_face_columns(faces, ["sample_id", "dataset", "split"])
    meta = meta.filter(pc.is_in(meta.column("split"), value_set=pa.array(cfg.splits)))
    kept = []
    for dataset, split in {(r["dataset"], r["split"]) for r in meta.select(["dataset", "split"]).to_pylist()}:
        rows = meta.filter(pc.and_(pc.equal(meta.column("dataset"), dataset), pc.equal(meta.column("split"), split)))
        kept += sorted(rows.column("sample_id").to_pylist())[: cfg.max_faces_per_dataset]
    return pa.array(kept, pa.string())


def _wanted(batch: pa.RecordBatch, cfg: EvaluateConfig, sample: pa.Array | None) -> pa.RecordBatch:
    batch = batch.filter(pc.is_in(batch.column("split"), value_set=pa.array(cfg.splits)))
    return batch if sample is None else batch.filter(pc.is_in(batch.column("sample_id"), value_set=sample))


def collect(models: list[EvalModel], faces: str, cfg: EvaluateConfig, device: torch.device) -> Collected:
    """Run every model over the selected faces (and their views), decoding each face once."""
    collected = Collected()
    sample = sampled_ids(faces, cfg)
    columns = ["sample_id", "dataset", "split", "image"]
    for batch in contracts.iter_face_batches(faces, columns=columns, batch_rows=cfg.batch_size):
        batch = _wanted(batch, cfg, sample)
        ids, datasets, splits = (batch.column(c).to_pylist() for c in ("sample_id", "dataset", "split"))
        images, kept = [], []
        for i, jpeg in enumerate(batch.column("image").to_pylist()):
            try:
                images.append(data.decode_jpeg(jpeg))
                kept.append(i)
            except UserError as err:
                collected.skipped.append({"sample_id": ids[i], "dataset": datasets[i], "reason": str(err)})
        if not kept:
            continue
        ids, datasets, splits = ([values[i] for i in kept] for values in (ids, datasets, splits))
        _predict(models, images, device, collected)
        collected.sample_id += ids
        collected.dataset += datasets
        collected.split += splits
        for view in cfg.views:
            chosen = [i for i, d in enumerate(datasets) if not view.datasets or d in view.datasets]
            if chosen:
                _predict(models, [apply_view(images[i], view) for i in chosen], device, collected)
                collected.sample_id += [ids[i] for i in chosen]
                collected.dataset += [f"{datasets[i]}{VIEW_SEPARATOR}{view.name}" for i in chosen]
                collected.split += [splits[i] for i in chosen]
    if not collected.sample_id:
        raise UserError(f"{faces}: no faces in split(s) {', '.join(cfg.splits)} to evaluate")
    return collected


# ---- ground truth and domains -------------------------------------------------------------------


def _label_column(table: pa.Table, name: str, positions: np.ndarray) -> np.ndarray:
    """A label column at ``positions`` as floats, NaN for no label (class codes too)."""
    return data.column_at(table, name, positions).to_numpy(zero_copy_only=False).astype(np.float64)


def ground_truth(collected: Collected, label_table: pa.Table) -> tuple[dict[str, np.ndarray], int]:
    """Label columns aligned with the collected faces (NaN = no label) and the count of faces without a label row."""
    positions = data.positions_in(pa.array(collected.sample_id, pa.string()), label_table, where="label table")
    truth = {
        name: _label_column(label_table, name, positions)
        for name in contracts.LABEL_SCHEMA.names
        if name != "sample_id"
    }
    truth["dataset"], truth["split"] = np.asarray(collected.dataset), np.asarray(collected.split)
    return truth, int((positions < 0).sum())


def check_labels_fit(faces: str, labels: str, label_table: pa.Table) -> None:
    """One line when the face and label tables do not name the same faces: a warning, or an error when they share
    none (nothing could be scored)."""
    face_ids = contracts.read_face_columns(faces, ["sample_id"]).column("sample_id")
    matched = int((data.positions_in(face_ids, label_table, where="label table") >= 0).sum())
    problem = contracts.mismatch(faces, f"label table {labels}", len(face_ids), label_table.num_rows, matched)
    if problem and not matched:
        raise UserError(problem)
    if problem:
        log.warning("%s; only the %d faces with a label row are scored", problem, matched)


def _card_coverage(card: ModelCard) -> dict[str, set[str]] | None:
    """task -> datasets with training labels, from the card's ``training.data.train`` ({dataset: {task: n}});
    None for a model saved outside a training run."""
    if card.training is None:
        return None
    summary = card.training.data.train
    return {task: {ds for ds, counts in summary.items() if counts.get(task, 0) > 0} for task in card.tasks}


_GROUND_TRUTH_ROLES = ("teacher", "baseline")  # trained on ground truth only: their cards count real labels


def in_domain_coverage(
    cfg: EvaluateConfig, models: list[EvalModel], faces: str, label_table: pa.Table
) -> tuple[dict[str, set[str]], str]:
    """task -> datasets whose ground truth for it was used in training, and where that came from.

    From the config when set; else from the cards of the teacher and the baselines (students are left out:
    their cards count pseudo-labels too); else from the train split of the label table, less the labels of
    evaluation-only datasets.
    """
    if cfg.in_domain is not None:
        return {task: set(cfg.in_domain.get(task, [])) for task in TASKS}, "config evaluate.in_domain"
    coverage: dict[str, set[str]] = {}
    sources = []
    for model in models:
        found = _card_coverage(model.card) if model.role and model.role.kind in _GROUND_TRUTH_ROLES else None
        if found is not None:
            sources.append(model.name)
            for task, datasets in found.items():
                coverage.setdefault(task, set()).update(datasets)
    if sources:
        return {task: coverage.get(task, set()) for task in TASKS}, f"model cards of {', '.join(sources)}"
    label_table, _ = contracts.training_labels(faces, label_table)
    meta = contracts.read_face_columns(faces, ["sample_id", "dataset", "split"])
    train = meta.filter(pc.equal(meta.column("split"), "train"))
    positions = data.positions_in(train.column("sample_id"), label_table, where="label table")
    datasets = np.asarray(train.column("dataset").to_pylist(), dtype=object)
    for task in TASKS:
        labelled = ~np.isnan(_label_column(label_table, task, positions))
        if f"{task}_low" in label_table.column_names:
            labelled |= ~np.isnan(_label_column(label_table, f"{task}_low", positions))
        coverage[task] = set(datasets[labelled].tolist())
    return coverage, "train split of the label table"


# ---- outputs ------------------------------------------------------------------------------------


def _safe(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text)


def confusion_name(model: str, task: str, dataset: str, split: str) -> str:
    return f"{_safe(model)}_{task}_{_safe(dataset)}_{split}"


def scalar_metrics(rows: list[dict], gaps: list[dict]) -> dict[str, float]:
    """Flat name -> value for the KFP UI: overall metrics and the fairness gaps."""
    scalars = {
        f"{r['model']}/{r['task']}/{r['dataset']}/{r['split']}/{r['metric']}": r["value"]
        for r in rows
        if r["group_by"] is None
    }
    scalars.update(
        {
            f"{g['model']}/{g['task']}/{g['dataset']}/{g['split']}/{g['metric']}/gap_{g['group_by']}": g["gap"]
            for g in gaps
        }
    )
    return scalars


def _json(value) -> str:
    return json.dumps(value, indent=1, default=sorted)


def training_curves(model: EvalModel) -> report.Plot | None:
    """The model folder's per-epoch training metrics as a plot, when it has them."""
    uri = store.join(model.uri, layout.TRAIN_METRICS)
    try:
        history = json.loads(store.read_text(uri))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        log.warning("%s is not JSON; no training curves for %s", uri, model.name)
        return None
    png = plots.training_curves(history["history"], history["lr"]["trace"])
    return report.Plot(f"{model.name} training curves", png)


def threshold_curves(uri: str) -> list[report.Plot]:
    """The holdout threshold curves of a pseudo-label report.json as a plot (none when it has no curves)."""
    try:
        pseudo_report = json.loads(store.read_text(uri))
    except FileNotFoundError:
        raise UserError(f"pseudo-label report {uri} not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"pseudo-label report {uri} is not JSON ({err})") from None
    series, xlabels = report.threshold_series(pseudo_report)
    png = plots.line_panels(series, f"pseudo-label quality on hidden labels ({uri})", xlabels)
    return [report.Plot(f"pseudo-label quality vs threshold: {uri}", png)] if png else []


def score_models(
    loaded: list[EvalModel], truth: dict[str, np.ndarray], predictions: dict[str, dict[str, np.ndarray]]
) -> tuple[list[dict], list[dict]]:
    """Every model's metric rows and confusion matrices, each tagged with the model's name."""
    rows, confusions = [], []
    for model in loaded:
        model_rows, model_confusions = metrics.score(truth, predictions[model.name])
        rows += [{"model": model.name, **row} for row in model_rows]
        confusions += [{"model": model.name, **c} for c in model_confusions]
    return rows, confusions


def write_confusions(confusions: list[dict], out: str) -> list[report.Plot]:
    """PNG + KFP-shaped JSON per confusion matrix under ``out/confusion/``; adds each PNG's URI as ``png``."""
    figures = []
    for c in confusions:
        base = store.join(out, layout.CONFUSION_DIR, confusion_name(c["model"], c["task"], c["dataset"], c["split"]))
        caption = f"{c['model']}: {c['task']} on {c['dataset']} ({c['split']})"
        png = plots.confusion_matrix(c["categories"], c["matrix"], caption)
        store.write_bytes(base + ".png", png, content_type="image/png")
        store.write_text(base + ".json", _json({"categories": c["categories"], "matrix": c["matrix"]}))
        c["png"] = base + ".png"
        figures.append(report.Plot(caption, png))
    return figures


def report_notes(
    cfg: EvaluateConfig,
    evaluated: list[dict],
    coverage: dict[str, set[str]],
    coverage_source: str,
    collected: Collected,
    unlabelled: int,
) -> list[str]:
    """What the reader of the report must know about the data behind the numbers."""
    counts = ", ".join(f"{e['dataset']}/{e['split']} {e['faces']}" for e in evaluated)
    domains = "; ".join(f"{task}: {', '.join(sorted(ds)) or '-'}" for task, ds in coverage.items())
    notes = [
        f"Faces evaluated: {counts}.",
        f"In-domain (datasets whose labels of a task were used in training, from {coverage_source}): {domains}. "
        f"Every other task x dataset row, and every {VIEW_SEPARATOR}view, is cross-domain.",
    ]
    names = {e["dataset"] for e in evaluated}
    for view in cfg.views:
        if not any(name.endswith(f"{VIEW_SEPARATOR}{view.name}") for name in names):
            log.warning("view %s matched no evaluated dataset (datasets: %s)", view.name, view.datasets or "all")
            notes.append(f"View {view.name} matched no evaluated dataset ({', '.join(view.datasets) or 'all'}).")
    if collected.skipped:
        notes.append(f"{len(collected.skipped)} face(s) skipped as undecodable (listed in {layout.EVAL_DETAILS}).")
    if unlabelled:
        notes.append(f"{unlabelled} evaluated face row(s) have no row in the label table.")
    return notes


def run(
    cfg: EvaluateConfig,
    models: list[str],
    faces: str,
    labels: str,
    out: str,
    pseudo_reports: list[str] | tuple[str, ...] = (),
) -> dict:
    """Evaluate ``models`` (folder URIs, optionally ``NAME=URI``) on the faces; ``pseudo_reports`` (optional
    pseudo-label report.json URIs) add their threshold curves to the report. Returns a summary."""
    use_threads(cfg.threads)
    device = resolve_device(cfg.device)
    try:
        label_table = contracts.read_table(labels, contracts.LABELS)
    except FileNotFoundError:
        raise UserError(f"label table {labels} not found (an ingest output's {layout.LABELS_FILE})") from None
    contracts.read_manifest(faces)  # a missing or unfinished face table fails here, before any model loads
    check_labels_fit(faces, labels, label_table)
    threshold_plots = [plot for uri in pseudo_reports for plot in threshold_curves(uri)]
    loaded = load_models(list(models), cfg, device)
    collected = collect(loaded, faces, cfg, device)
    truth, unlabelled = ground_truth(collected, label_table)
    rows, confusions = score_models(loaded, truth, collected.arrays())
    gaps = metrics.fairness_gaps(rows, cfg.fairness_min_group)
    coverage, coverage_source = in_domain_coverage(cfg, loaded, faces, label_table)
    assessed = claims.assess(rows, {m.name: m.role for m in loaded}, coverage, cfg.claims_split)
    names = [m.name for m in loaded]
    comparison = claims.comparison_table(rows, names, cfg.claims_split, coverage)
    evaluated = [
        {"dataset": d, "split": s, "faces": n}
        for (d, s), n in sorted(Counter(zip(collected.dataset, collected.split, strict=True)).items())
    ]
    model_info = [
        {
            "name": m.name,
            "role": str(m.role) if m.role else None,
            "uri": m.uri,
            "tasks": m.card.tasks,
            "backbone": m.card.backbone,
            "input_size": m.card.input_size,
        }
        for m in loaded
    ]

    html = report.render(
        title="Distill-2MD-MTL evaluation",
        models=model_info,
        claims=assessed,
        comparison=comparison,
        rows=rows,
        gaps=gaps,
        confusion_plots=write_confusions(confusions, out),
        curve_plots=[p for p in (training_curves(m) for m in loaded) if p is not None],
        threshold_plots=threshold_plots,
        notes=report_notes(cfg, evaluated, coverage, coverage_source, collected, unlabelled),
        fairness_min_group=cfg.fairness_min_group,
    )
    scalars = scalar_metrics(rows, gaps)
    store.write_text(store.join(out, layout.EVAL_METRICS), _json(scalars))
    store.write_text(
        store.join(out, layout.EVAL_CLAIMS),
        _json(
            {
                "split": cfg.claims_split,
                "claims": assessed,
                "markdown": claims.claims_markdown(assessed),
                "comparison": {"header": comparison[0], "rows": comparison[1]},
            }
        ),
    )
    store.write_text(
        store.join(out, layout.EVAL_DETAILS),
        _json(
            {
                "models": model_info,
                "faces": evaluated,
                "skipped": collected.skipped,
                "faces_without_labels": unlabelled,
                "coverage": coverage,
                "coverage_source": coverage_source,
                "rows": rows,
                "fairness_gaps": gaps,
                "confusion": confusions,
            }
        ),
    )
    report_uri = store.join(out, layout.EVAL_REPORT_HTML)
    store.write_bytes(report_uri, html.encode(), content_type="text/html; charset=utf-8")
    for claim in assessed:
        log.info("claim %d (%s): %s: %s", claim["claim"], claim["text"], claim["status"], claim["reason"])
    return {
        "models": names,
        "faces": evaluated,
        "metrics": scalars,
        "claims": [{"claim": c["claim"], "status": c["status"], "reason": c["reason"]} for c in assessed],
        "report": report_uri,
        "confusion": [c["png"] for c in confusions],
    }
