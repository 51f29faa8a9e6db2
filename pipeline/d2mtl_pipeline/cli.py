"""The d2mtl command (the console script): every command of d2mtl.cli, and ``run`` / ``compile`` / ``submit``,
which need the pipeline."""

from __future__ import annotations

import argparse
import sys

from d2mtl import cli as library_cli
from d2mtl import layout
from d2mtl.cli import load_config

RUN_EXAMPLES = """examples:
  d2mtl run --data-root ../shared/data          # the whole chain, CPU profile; a second run is all cache hits
  d2mtl run --rerun teacher                     # recompute the teacher and what follows, reuse the ingest
  d2mtl run --set pipeline.publish_prefix=s3://d2mtl/results   # also publish to <prefix>/<run>/<stage>/...
"""

COMPILE_EXAMPLES = """examples:
  d2mtl compile --out pipeline.yaml                 # upload it in the KFP UI
  d2mtl compile --config gpu --out s3://d2mtl/pipelines/d2mtl.yaml --set pipeline.shards=8
"""

SUBMIT_EXAMPLES = """examples:
  d2mtl submit --config gpu --host http://localhost:8080 --param publish_prefix=s3://d2mtl/results
  d2mtl submit --config gpu --host http://localhost:8080 --param ingest_shards=16 --param shards=8
  # rerun the student (and evaluate) of an earlier run, importing everything upstream from what it published:
  d2mtl submit --config gpu --host http://localhost:8080 --param publish_prefix=s3://d2mtl/results \\
               --rerun student --from-run 7c0e0b6e-2f7e-4a51-9d43-0c1f4e0b9a11
"""


def cmd_run(args: argparse.Namespace) -> None:
    from d2mtl_pipeline import local

    result = local.run(load_config(args), rerun=args.rerun, from_run=args.from_run)
    print(local.summary(result))


def cmd_compile(args: argparse.Namespace) -> None:
    from d2mtl_pipeline import compile as compile_module

    cfg = load_config(args)
    reuse = compile_module.plan_rerun(cfg, args.rerun, args.from_run)
    print(f"wrote {compile_module.compile_pipeline(cfg, args.out, reuse=reuse)}")


def cmd_submit(args: argparse.Namespace) -> None:
    from d2mtl_pipeline import submit

    run_id = submit.submit(
        load_config(args),
        host=args.host,
        experiment=args.experiment,
        run_name=args.run_name,
        params=args.params,
        rerun=args.rerun,
        from_run=args.from_run,
        namespace=args.namespace,
    )
    print(f"submitted run {run_id}: {args.host.rstrip('/')}/#/runs/details/{run_id}")


def _rerun_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rerun",
        metavar="STAGE",
        choices=layout.STAGES,
        help=f"recompute STAGE and everything downstream of it, nothing upstream; stages: {', '.join(layout.STAGES)}",
    )
    parser.add_argument(
        "--from-run",
        metavar="RUN_ID",
        help="with --rerun: import the other stages' outputs from what run RUN_ID published under "
        "pipeline.publish_prefix (<prefix>/<RUN_ID>/<stage>/...)",
    )


def add_pipeline_commands(sub) -> None:
    """run, compile and submit, as sub-commands of ``sub`` (the parser's sub-parsers)."""

    def add(name: str, func, help_text: str, examples: str) -> argparse.ArgumentParser:
        return library_cli.add_command(sub, name, func, help_text, examples, reads_datasets=True)

    p = add(
        "run",
        cmd_run,
        "run the whole pipeline on this machine (kfp.local; cached, resumable stage by stage)",
        RUN_EXAMPLES,
    )
    _rerun_flags(p)

    p = add(
        "compile",
        cmd_compile,
        "compile the pipeline to KFP IR YAML (upload it in the KFP UI, or use submit)",
        COMPILE_EXAMPLES,
    )
    p.add_argument("--out", default="pipeline.yaml", help="output file, *.yaml, local or s3:// (default pipeline.yaml)")
    _rerun_flags(p)

    p = add(
        "submit", cmd_submit, "compile the pipeline and start a run on a Kubeflow Pipelines endpoint", SUBMIT_EXAMPLES
    )
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    p.add_argument("--experiment", help="KFP experiment (default: the experiment name of the config)")
    p.add_argument("--run-name", help="run name (default: the experiment name)")
    p.add_argument("--namespace", help="Kubernetes namespace of a multi-user KFP (default kubeflow)")
    p.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline parameter for this run, e.g. shards=8 or publish_prefix=s3://b/results "
        "(repeatable); stage settings: --set section.field=value",
    )
    _rerun_flags(p)


def build_parser() -> argparse.ArgumentParser:
    return library_cli.build_parser(add_pipeline_commands)


def main(argv: list[str] | None = None) -> int:
    return library_cli.dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
