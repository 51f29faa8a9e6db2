"""d2mtl: one command, a sub-command per stage and per user action.

examples:

    d2mtl ingest   --config cpu --data-root ../shared/data --out runs/manual/ingest
    d2mtl ingest   ... --out runs/manual/ingest-1 --shard 1/4      # one part; then merge the four parts:
    d2mtl ingest   --out runs/manual/ingest --merge runs/manual/ingest-0 runs/manual/ingest-1 ...
    d2mtl teacher  --config cpu --faces runs/manual/ingest/faces --labels runs/manual/ingest/labels.parquet \\
                   --out runs/manual/teacher
    d2mtl teacher  ... --tasks age --out runs/manual/baselines/age      # a single-task baseline
    d2mtl pseudolabel --config cpu --teacher runs/manual/teacher --faces ... --labels ... \\
                   --out runs/manual/pseudolabel [--shard 0/4]
    d2mtl student  --config cpu --faces ... --labels ... --pseudo runs/manual/pseudolabel/pseudo.parquet \\
                   --out runs/manual/student
    d2mtl evaluate --config cpu --models runs/manual/teacher,runs/manual/student --faces ... --labels ... \\
                   --out runs/manual/evaluate
    d2mtl upload-data --data-root ../shared/data --dest s3://d2mtl/datasets      # for a cluster run
    d2mtl run                      # the whole pipeline on this machine (kfp.local)
    d2mtl predict photos/ group.jpg --format csv      # faces + age, gender, race, expression (latest run's model)
    d2mtl export --model runs/manual/student --format onnx --out exports/student-onnx
    d2mtl serve --model runs/manual/student --port 8080      # a KServe model server (pip install '.[serve]')

Every path may be a local path or an s3://bucket/key URI. d2mtl COMMAND --help shows the command's options and
examples. Exit codes: 0 done; 2 a mistake in the command, config or input, told in one line; 130 interrupted;
predict also 3, 4 and 5 (see d2mtl predict --help).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from d2mtl.config import updated
from d2mtl.errors import UserError

FOLDER_OUTPUTS = ("ingest", "teacher", "pseudolabel", "student", "evaluate", "export")  # their --out is a folder
SET_EXAMPLES = {
    "ingest": "ingest.datasets.0.limit=100",
    "pseudolabel": "pseudolabel.batch_size=128",
    "student": "student.epochs=2",
    "evaluate": "evaluate.splits=[val,test]",
    "upload-data": "store.endpoint=http://localhost:9000",
    "predict": "ingest.detector.min_score=0.8",
    "export": "pipeline.run_root=runs",
    "serve": "ingest.detector.min_score=0.8",
}
PREDICT_EXIT_CODES = """exit codes:
  0  faces were found, and every input was read
  2  a mistake in the command, config, model or storage, told in one line
  3  every input was read, none had a face: nothing was predicted
  4  an input was unreadable or missing; others had faces
  5  an input was unreadable or missing, and no other had a face"""


def add_command(
    sub,
    name: str,
    func: Callable[[argparse.Namespace], int | None],
    help_text: str,
    epilog: str | None,
    *,
    reads_datasets: bool = False,
) -> argparse.ArgumentParser:
    """The sub-command ``name`` of ``sub`` (the parser's sub-parsers), with --config, --set and, where it reads the
    datasets, --data-root."""
    command = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("--config", default=None, help="experiment YAML, or a packaged profile: cpu (default), gpu")
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field, e.g. --set {SET_EXAMPLES.get(name, 'teacher.epochs=2')} "
        "(repeatable; list entries by index)",
    )
    if reads_datasets:
        command.add_argument(
            "--data-root",
            default=None,
            help="folder (or s3:// prefix) holding the datasets; default ./data or $D2MTL_DATA_ROOT",
        )
    command.set_defaults(func=func)
    return command


def _examples(command: str) -> str | None:
    """The lines of this module's examples for ``command`` (with their continuation lines), as an epilog."""
    lines, keep = [], False
    for line in __doc__.splitlines():
        if line.startswith("    d2mtl "):
            keep = line.split()[1] == command
        elif not line.startswith("      "):
            keep = False
        if keep:
            lines.append(line)
    return "examples:\n" + "\n".join(lines) if lines else None


def load_config(args: argparse.Namespace):
    """The experiment of --config, --set and --data-root, with the store configured from it."""
    from d2mtl import store
    from d2mtl.config import load_experiment

    cfg = load_experiment(args.config, args.overrides, data_root=getattr(args, "data_root", None))
    store.configure(cfg.store)
    return cfg


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("distill-2md-mtl")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _restart_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the checkpoint at --out and train from the start (by default a run resumes "
        "from it, and only with the same settings and inputs)",
    )


def _split_list(value: str) -> list[str]:
    return [item for item in value.split(",") if item]


def _threads(value: str) -> int:
    """--threads: config.fields.Threads on the command line (a count of at least 1; absent: torch's default)."""
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise argparse.ArgumentTypeError(f"--threads {value!r}: expected a count of at least 1")
    return threads


def _shard(value: str) -> tuple[int, int]:
    from d2mtl.layout import check_shard

    index, _, count = value.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {value!r}: expected i/n, e.g. 0/4") from None
    try:
        check_shard(i, n)
    except UserError as err:
        raise argparse.ArgumentTypeError(f"--shard {value!r}: {err}") from None
    return i, n


def cmd_ingest(args: argparse.Namespace) -> None:
    from d2mtl.stages import ingest

    cfg = load_config(args)
    if args.merge:
        ingest.merge(args.merge, args.out)
    else:
        ingest.run(cfg.ingest, args.out, shard=args.shard)


def cmd_teacher(args: argparse.Namespace) -> None:
    from d2mtl.stages import teacher

    cfg = load_config(args)
    train_cfg = cfg.teacher if args.tasks is None else updated(cfg.teacher, "--tasks", tasks=args.tasks)
    teacher.run(train_cfg, faces=args.faces, labels=args.labels, out=args.out, restart=args.restart)


def cmd_pseudolabel(args: argparse.Namespace) -> None:
    from d2mtl.stages import pseudolabel

    cfg = load_config(args)
    pl_cfg = cfg.pseudolabel if args.tasks is None else updated(cfg.pseudolabel, "--tasks", tasks=args.tasks)
    if args.merge:
        pseudolabel.merge(pl_cfg, parts=args.merge, out=args.out)
        return
    if args.hide_labels:
        if not args.labels or not args.faces:
            raise UserError("pseudolabel --hide-labels needs --faces and --labels")
        written = pseudolabel.write_holdout_labels(pl_cfg, faces=args.faces, labels=args.labels, out=args.out)
        print(f"train the teacher with --labels {written['labels']} (hidden: {written['hidden']})")
        return
    for name in ("teacher", "faces", "labels"):
        if not getattr(args, name):
            raise UserError(f"pseudolabel needs --{name} (or --merge PART ... to merge shards)")
    pseudolabel.run(pl_cfg, teachers=args.teacher, faces=args.faces, labels=args.labels, out=args.out, shard=args.shard)


def cmd_student(args: argparse.Namespace) -> None:
    from d2mtl.stages import student

    cfg = load_config(args)
    student.run(
        cfg.student,
        faces=args.faces,
        labels=args.labels,
        pseudo=args.pseudo,
        out=args.out,
        teacher=args.teacher,
        restart=args.restart,
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from d2mtl.stages import evaluate

    cfg = load_config(args)
    result = evaluate.run(
        cfg.evaluate,
        models=args.models,
        faces=args.faces,
        labels=args.labels,
        out=args.out,
        pseudo_reports=args.pseudo_reports,
    )
    print(f"report: {result['report']}")


def cmd_upload_data(args: argparse.Namespace) -> None:
    from d2mtl import upload

    cfg = load_config(args)
    summary = upload.upload_tree(cfg.ingest.data_root, args.dest, workers=args.workers, overwrite=args.overwrite)
    print(
        f"uploaded {summary.uploaded} files ({summary.bytes_uploaded / 1e6:.1f} MB) to {summary.dest}; "
        f"{summary.skipped} already there"
    )


def _model_or_latest(model: str | None, cfg) -> str:
    from d2mtl.predict import latest_model

    return model or latest_model(cfg.pipeline.run_root)


def cmd_predict(args: argparse.Namespace) -> int:
    from d2mtl import predict
    from d2mtl.devices import use_threads

    cfg = load_config(args)
    use_threads(args.threads)
    images = predict.list_images(args.paths)
    analyzer = predict.Analyzer(
        _model_or_latest(args.model, cfg), device=args.device, ingest=cfg.ingest, batch_size=args.batch_size
    )
    counts = predict.write_results(analyzer.analyze_iter(images), args.format, sys.stdout, analyzer.tasks)
    print(predict.summary_line(counts), file=sys.stderr)
    return predict.exit_code(counts)


def cmd_export(args: argparse.Namespace) -> None:
    from d2mtl import export, store

    cfg = load_config(args)
    card = export.export_model(_model_or_latest(args.model, cfg), args.format, args.out)
    print(f"wrote {store.join(args.out, card.export.file)} (outputs: {', '.join(card.export.outputs)})")


def cmd_serve(args: argparse.Namespace) -> None:
    from d2mtl.devices import use_threads

    cfg = load_config(args)
    use_threads(args.threads)
    sys.argv[1:] = []  # kserve parses the command line when it is imported: these arguments are d2mtl's
    try:
        from d2mtl import serve
    except ImportError as err:
        raise UserError(f"d2mtl serve needs the serve extra (pip install 'distill-2md-mtl[serve]'): {err}") from None
    serve.serve(
        _model_or_latest(args.model, cfg),
        name=args.name,
        port=args.port,
        device=args.device,
        ingest=cfg.ingest,
        batch_size=args.batch_size,
        backend=args.backend,
        max_request_mb=args.max_request_mb,
    )


def build_parser(more_commands: Callable[..., None] | None = None) -> argparse.ArgumentParser:
    """The d2mtl command line: the stage and user commands defined here, then those ``more_commands(sub)`` adds
    to the sub-parsers ``sub`` (the pipeline layer adds run, compile and submit)."""
    parser = argparse.ArgumentParser(
        prog="d2mtl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"d2mtl {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, func: Callable[[argparse.Namespace], int | None], help_text: str, reads_datasets: bool = False
    ) -> argparse.ArgumentParser:
        epilog = "\n\n".join(
            part for part in (_examples(name), PREDICT_EXIT_CODES if name == "predict" else None) if part
        )
        return add_command(sub, name, func, help_text, epilog or None, reads_datasets=reads_datasets)

    p = add(
        "ingest",
        cmd_ingest,
        "read datasets, detect and align faces, write the face and label tables",
        reads_datasets=True,
    )
    p.add_argument("--out", required=True, help="output prefix (faces/, labels.parquet, report.json/.md)")
    p.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        help="ingest part i of n of the planned images (i/n, default 0/1: all), a complete output each",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="PART",
        help="merge the --out folders of every --shard i/n run into --out instead (same tables as one pass)",
    )

    p = add("teacher", cmd_teacher, "train the multi-task teacher (or a single-task baseline with --tasks)")
    p.add_argument("--faces", required=True, help="face table (folder with _manifest.json)")
    p.add_argument("--labels", required=True, help="label table (Parquet)")
    p.add_argument("--out", required=True, help="model folder (weights, model card, checkpoint, curves)")
    p.add_argument("--tasks", type=_split_list, default=None, help="comma-separated tasks, e.g. age")
    _restart_flag(p)

    p = add("pseudolabel", cmd_pseudolabel, "data distillation: pseudo-label missing labels with the teacher")
    p.add_argument(
        "--teacher", type=_split_list, default=None, help="teacher model folder(s), comma-separated for an ensemble"
    )
    p.add_argument("--faces", help="face table")
    p.add_argument("--labels", help="label table")
    p.add_argument("--out", required=True, help="output prefix (pseudo.parquet, report.json)")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="process shard i of n (i/n, default 0/1)")
    p.add_argument("--merge", nargs="+", metavar="PART", help="merge shard outputs into --out instead")
    p.add_argument(
        "--tasks",
        type=_split_list,
        default=None,
        help="comma-separated tasks (the teacher's), e.g. age for a single-task baseline teacher",
    )
    p.add_argument(
        "--hide-labels",
        action="store_true",
        help="holdout mode, before the teacher: write --labels minus the hidden labels (and the hidden "
        "truth) under --out; needs pseudolabel.holdout.fraction > 0",
    )

    p = add("student", cmd_student, "train the student on ground truth + kept pseudo-labels")
    p.add_argument("--faces", required=True, help="face table (folder with _manifest.json)")
    p.add_argument("--labels", required=True, help="label table (Parquet)")
    p.add_argument("--pseudo", required=True, help="pseudo-label table (Parquet)")
    p.add_argument("--teacher", default=None, help="teacher model folder (for init: teacher)")
    p.add_argument("--out", required=True, help="model folder (weights, model card, checkpoint, curves)")
    _restart_flag(p)

    p = add("evaluate", cmd_evaluate, "evaluate models per task x dataset x split, fairness audit, claims")
    p.add_argument(
        "--models",
        type=_split_list,
        required=True,
        help="model folders, comma-separated; NAME=URI to name one (teacher=..., baseline_age=..., "
        "student=..., student_single_age=...: the name gives the role in the claims)",
    )
    p.add_argument("--faces", required=True, help="face table of any ingest, also of datasets never trained on")
    p.add_argument("--labels", required=True, help="label table of the same ingest (Parquet)")
    p.add_argument(
        "--pseudo",
        dest="pseudo_reports",
        type=_split_list,
        default=[],
        help="pseudo-label report.json file(s), comma-separated: their threshold curves go in the report",
    )
    p.add_argument("--out", required=True, help="output prefix (report.html, metrics.json, claims.json, confusion/)")

    p = add(
        "upload-data",
        cmd_upload_data,
        "copy the data root (--data-root) into object storage for cluster runs",
        reads_datasets=True,
    )
    p.add_argument("--dest", required=True, help="destination prefix, e.g. s3://d2mtl/datasets")
    p.add_argument("--workers", type=int, default=8, help="parallel uploads (default 8)")
    p.add_argument("--overwrite", action="store_true", help="upload files that already exist at --dest again")

    p = add("predict", cmd_predict, "detect faces in images and predict age, gender, race and expression in one pass")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders, s3:// prefixes")
    p.add_argument(
        "--model",
        default=None,
        help="model folder (teacher / student output); default: the final model of the latest d2mtl run "
        "(<pipeline.run_root>/latest.json)",
    )
    p.add_argument(
        "--format",
        choices=("json", "csv", "table"),
        default="table",
        help="json: one object per image per line; csv: one row per face; table (default): a line per face",
    )
    p.add_argument("--batch-size", type=int, default=64, help="faces per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=_threads, default=None, help="CPU threads for the network and the detector")

    p = add("export", cmd_export, "export a model as ONNX or TorchScript (dynamic batch axis, model card included)")
    p.add_argument("--model", default=None, help="model folder; default: the final model of the latest d2mtl run")
    p.add_argument(
        "--format",
        choices=("onnx", "torchscript"),
        required=True,
        help="onnx: model.onnx (opset 18, onnxruntime); torchscript: model.torchscript.pt (LibTorch)",
    )
    p.add_argument("--out", required=True, help="output folder (model.onnx or model.torchscript.pt + model_card.json)")

    p = add("serve", cmd_serve, "serve a model with KServe: v1 and v2 inference endpoints and a page to try it (/ui)")
    p.add_argument(
        "--model", default=None, help="model folder (local or s3://); default: the final model of the latest d2mtl run"
    )
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    p.add_argument("--name", default="d2mtl", help="model name in the endpoint paths (default d2mtl)")
    p.add_argument(
        "--max-request-mb",
        type=float,
        default=16.0,
        help="larger request bodies are refused with 413 before they are read (default 16)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="faces per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="forward pass: auto (default: onnxruntime on CPU, where it measures faster; torch on a GPU)",
    )
    p.add_argument("--threads", type=_threads, default=None, help="CPU threads for the network and the detector")

    if more_commands is not None:
        more_commands(sub)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names (default: this process's arguments); its exit code."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.command in FOLDER_OUTPUTS:
            from d2mtl import store

            store.check_folder(args.out, "--out")
        code = args.func(args) or 0  # predict has exit codes of its own (d2mtl.predict.exit_code)
    except UserError as err:
        print(f"d2mtl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nd2mtl {args.command}: interrupted", file=sys.stderr)  # not glued to a progress bar's line
        return 130
    return code


def main(argv: list[str] | None = None) -> int:
    """The stage and user commands alone, as ``python -m d2mtl.cli`` (what torchrun starts) runs them; the d2mtl
    console script is ``d2mtl_pipeline.cli.main``, which adds the pipeline commands."""
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
