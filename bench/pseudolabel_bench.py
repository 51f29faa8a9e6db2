"""Pseudo-label stage benchmarks on the real ingest output.

speed:   the stage's faces/s (x K transforms = views/s) against bare batched inference of the same model on
         the same views already in memory, same process, alternating; goal: stage / bare >= 0.9. Weights do not
         change the speed, so an untrained model of the configured teacher architecture is fine.
holdout: the honest way to choose thresholds. Hides a share of the known labels (UTKFace age, FER2013
         expression by default), trains the teacher on the rest with the profile's teacher config (or takes
         --teacher, which must have been trained on the labels this writes), pseudo-labels everything and prints
         the accuracy / MAE of the pseudo-labels against the hidden truth at the configured rule and along the
         swept thresholds.

Examples::

    .venv/bin/python bench/pseudolabel_bench.py speed --ingest /work/runs/ingest-full \
        --work /work/runs/pseudolabel/bench
    .venv/bin/python bench/pseudolabel_bench.py holdout --ingest /work/runs/ingest-full \\
        --work /work/runs/pseudolabel/holdout --fraction 0.2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter

import torch

from d2mtl import contracts, data, layout, models, store
from d2mtl.config import load_experiment
from d2mtl.stages import pseudolabel


def subset_faces(ingest: str, out: str, per_dataset: int, shard_rows: int) -> str:
    """The first ``per_dataset`` faces of each dataset as a face table under ``out`` (reused when present)."""
    faces = store.join(out, "faces")
    if store.exists(store.join(faces, layout.FACES_MANIFEST)):
        return faces
    writer = contracts.FaceTableWriter(faces, shard_rows=shard_rows)
    taken: Counter = Counter()
    for batch in contracts.iter_face_batches(layout.faces(ingest)):
        for row in batch.to_pylist():
            if taken[row["dataset"]] < per_dataset:
                taken[row["dataset"]] += 1
                writer.write(row)
    writer.close()
    return faces


def untrained_teacher(cfg, out: str) -> str:
    """A teacher of the profile's architecture with untrained weights (speed does not depend on them)."""
    net = models.MultiTaskNet(models.ModelSpec.from_config(cfg.teacher.model, cfg.teacher.task_names), weights="none")
    models.save_model(net.eval(), out, role="teacher")
    return out


def bare_inference_seconds(teacher: str, faces: str, transforms: list[str], batch_size: int) -> tuple[float, int]:
    """Seconds for the model alone over every face's views, prepared in memory beforehand."""
    net, card = models.load_model(teacher)
    jpegs = [
        jpeg
        for batch in contracts.iter_face_batches(faces, columns=["image"], batch_rows=batch_size)
        for jpeg in batch.column("image").to_pylist()
    ]
    batches = []
    for start in range(0, len(jpegs), batch_size):
        x = data.preprocess(jpegs[start : start + batch_size], card.input_size, card.mean, card.std)
        views = pseudolabel.make_views(x, transforms)
        batches.append(
            [torch.cat([v for v in views if v.shape == shape]) for shape in dict.fromkeys(v.shape for v in views)]
        )
    begin = time.perf_counter()
    for groups in batches:
        for group in groups:
            net.predict(group)
    return time.perf_counter() - begin, len(jpegs)


def speed(args: argparse.Namespace) -> None:
    exp = load_experiment(args.config, args.set)
    cfg = exp.pseudolabel
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    faces = subset_faces(args.ingest, args.work, args.faces_per_dataset, args.shard_rows)
    teacher = args.teacher or untrained_teacher(exp, store.join(args.work, "teacher"))
    labels = layout.labels(args.ingest)
    bare, stage = [], []
    for _ in range(args.repeats):
        seconds, count = bare_inference_seconds(teacher, faces, cfg.transforms, cfg.batch_size)
        bare.append(seconds)
        begin = time.perf_counter()
        pseudolabel.run(cfg, [teacher], faces, labels, store.join(args.work, "out"))
        stage.append(time.perf_counter() - begin)
    card = contracts.read_model_card(teacher)
    k = len(cfg.transforms)
    ratio = min(bare) / min(stage)
    print(
        f"\n{count} faces ({args.faces_per_dataset} per dataset), {card.backbone} {card.input_size} px, "
        f"K={k} transforms {cfg.transforms}, batch {cfg.batch_size}, {torch.get_num_threads()} threads, "
        f"best of {args.repeats}"
    )
    print("| measure | faces/s | views/s (x K) |\n|---|---|---|")
    print(f"| bare batched inference (views in memory) | {count / min(bare):.0f} | {count * k / min(bare):.0f} |")
    print(
        f"| pseudo-label stage (read, decode, infer, select, write) | {count / min(stage):.0f} | "
        f"{count * k / min(stage):.0f} |"
    )
    print(f"| stage / bare | {ratio:.2f} (goal >= 0.9) | |")
    print(
        "stage / bare of each repeat (the load moves between runs): "
        + ", ".join(f"{b / s:.2f}" for b, s in zip(bare, stage, strict=True))
    )


def holdout(args: argparse.Namespace) -> None:
    from d2mtl.stages import teacher as teacher_stage

    overrides = [*args.set, f"pseudolabel.holdout.fraction={args.fraction}"]
    exp = load_experiment(args.config, overrides)
    cfg = exp.pseudolabel
    faces, labels = layout.faces(args.ingest), layout.labels(args.ingest)
    hidden = pseudolabel.write_holdout_labels(cfg, faces, labels, store.join(args.work, "labels"))
    teacher = args.teacher
    if teacher is None:
        teacher = store.join(args.work, "teacher")
        begin = time.perf_counter()
        teacher_stage.run(exp.teacher, faces, hidden["labels"], teacher)
        print(f"teacher trained on the holdout labels in {time.perf_counter() - begin:.0f} s")
    begin = time.perf_counter()
    result = pseudolabel.run(cfg, [teacher], faces, labels, store.join(args.work, "pseudolabel"))
    seconds = time.perf_counter() - begin
    report = json.loads(store.read_text(result["report"]))
    print(
        f"\nholdout: {args.fraction:g} of the known {', '.join(cfg.holdout.tasks)} labels hidden "
        f"(seed {cfg.holdout.seed}); teacher {teacher}; transforms {cfg.transforms}; stage {seconds:.0f} s"
    )
    print("| task | rule | hidden | kept | retention | accuracy / MAE |\n|---|---|---|---|---|---|")
    for task, info in report["holdout"]["curves"].items():
        chosen, rule = info["chosen"], report["rules"][task]
        quality = chosen.get("accuracy", chosen.get("mae"))
        print(
            f"| {task} | {json.dumps(rule)} | {chosen['hidden']} | {chosen['kept']} | {chosen['retention']:.3f} | "
            f"{'-' if quality is None else f'{quality:.3f}'} |"
        )
    for task, info in report["holdout"]["curves"].items():
        quality = "accuracy" if "accuracy" in info["chosen"] else "mae"
        for rule, sweep in {info["rule"]: info, **info["other_rules"]}.items():
            parameter = sweep["parameter"]
            print(f"\n{task}, rule {rule}: {quality} of the kept pseudo-labels on the hidden rows")
            print(f"| {parameter} | kept | retention | {quality} |\n|---|---|---|---|")
            for point in sweep["curve"]:
                value = point[quality]
                print(
                    f"| {point[parameter]:g} | {point['kept']} | {point['retention']:.3f} | "
                    f"{'-' if value is None else f'{value:.3f}'} |"
                )
    print(f"\ncurves: {store.join(args.work, 'pseudolabel', layout.PSEUDO_HOLDOUT_PLOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("speed", speed), ("holdout", holdout)):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("--ingest", required=True, help="ingest output (faces/ + labels.parquet)")
        p.add_argument("--work", required=True, help="scratch folder for the outputs")
        p.add_argument("--config", default="cpu", help="experiment profile or YAML (default cpu)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
        p.add_argument("--teacher", default=None, help="teacher model folder (default: see the command)")
    p = sub.choices["speed"]
    p.add_argument("--faces-per-dataset", type=int, default=1500)
    p.add_argument("--shard-rows", type=int, default=1024, help="face-table shard size of the subset")
    p.add_argument("--repeats", type=int, default=2, help="alternating bare / stage runs; the best of each counts")
    sub.choices["holdout"].add_argument("--fraction", type=float, default=0.2, help="share of known labels hidden")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
