"""``d2mtl run``: the whole pipeline on this machine through ``kfp.local`` (SubprocessRunner, no containers).

Run folders and the task cache live under ``pipeline.run_root`` (``runs/`` by default): every run gets a folder named
by its run id (``<experiment>-<timestamp>-<random>``) holding the tasks that ran and ``kfp-local.log``, kfp.local's
whole output; the console shows one line per task and the stages' own log records. A task whose inputs did not
change is a cache hit and its outputs stay where an earlier run wrote them (so keep old run folders, or delete
``runs/`` entirely).

``--rerun STAGE`` recomputes a stage even though its inputs did not change (new code, a flaky result): the stage's
tasks get a new token (an environment variable, part of kfp.local's cache key), recorded in
``<run_root>/reruns.json`` so later runs keep using the recomputed results; everything downstream recomputes
because its inputs changed, nothing upstream does.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO
from unittest import mock

from d2mtl import layout, store
from d2mtl.config import ExperimentConfig
from d2mtl.errors import UserError
from d2mtl_pipeline import compile as compile_module
from d2mtl_pipeline import pipeline
from d2mtl_pipeline.steps import STAGE_SECONDS

log = logging.getLogger("d2mtl.pipeline")

RERUNS_FILE = "reruns.json"
EXECUTOR_OUTPUT = "executor_output.json"
RUN_LOG = "kfp-local.log"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_CACHED = re.compile(r"Task (\S+) cache hit")
_STAGE_LINE = re.compile(r"^\s*(\d\d:\d\d:\d\d (?:INFO|WARNING|ERROR) d2mtl[\w.]*: .*|d2mtl \S+: error: .*)$")
_LOCAL_NOISE = (  # kfp.local warnings about settings that only matter on a cluster
    r"You may be attemping to run a task that uses custom or non-Python base image",
    r"Task .* settings .* have no effect in the current local runner",
)


@dataclass
class LocalRun:
    run_id: str  # the <run> of the published layout
    run_dir: Path  # this run's folder, <run_root>/<run_id>: the tasks that ran (none when all were cache hits), the log
    model: str  # the final model folder
    report: str  # report.html
    wall_seconds: float
    executed: list[str] = field(default_factory=list)  # tasks that ran, e.g. teacher, <loop>-iteration-0/baseline
    stage_seconds: dict[str, float] = field(default_factory=dict)  # executed task -> its stage function's time
    published: str | None = None  # <publish_prefix>/<run_id>


class RunLog(io.TextIOBase):
    """Where kfp.local's output goes during a run: all of it (its task banners, every task's streamed output and
    executor outputs) into the file ``path``; to ``console`` one line per task (started, finished in N s, cached)
    and the stages' own log records and errors. Loop iterations run in threads: writes are serialised."""

    def __init__(self, path: Path, console: TextIO):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.console = path, console
        self.file = path.open("w")
        self.pending = ""
        self.started: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:  # never print() in here: kfp.local's print writes its indent to sys.stdout, i.e. here
            self.file.write(text)
            *lines, self.pending = (self.pending + text).split("\n")
            for line in lines:
                shown = self.console_line(_ANSI.sub("", line))
                if shown:
                    self.console.write(shown + "\n")
                    self.console.flush()
        return len(text)

    def console_line(self, line: str) -> str | None:
        if started := _STARTED.search(line):
            self.started[started[1]].append(time.perf_counter())
            return f"{started[1]}: started"
        if finished := _FINISHED.search(line):
            starts = self.started[finished[1]]
            seconds = time.perf_counter() - starts.pop(0) if starts else 0.0
            outcome = {"SUCCESS": "succeeded", "FAILURE": "failed"}.get(finished[2], finished[2].lower())
            return f"{finished[1]}: {outcome} in {seconds:.1f} s"
        if cached := _CACHED.search(line):
            return f"{cached[1]}: cached"
        if stage := _STAGE_LINE.match(line):
            return f"  {stage[1]}"
        return None

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes first
            self.file.close()


@contextlib.contextmanager
def kfp_records_to(stream: TextIO) -> Iterator[None]:
    """kfp.local also logs through the root logger outside its task contexts (cache hits, skipped conditions):
    send those records (logger name ``root``) to ``stream`` alone, and every other record where it went before."""
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    handler.addFilter(lambda record: record.name == "root")
    before = list(root.handlers)
    for other in before:
        other.addFilter(_not_kfp)
    level = root.level
    root.setLevel(min(level, logging.INFO))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for other in before:
            other.removeFilter(_not_kfp)


def _not_kfp(record: logging.LogRecord) -> bool:
    return record.name != "root"


def load_tokens(run_root: Path) -> dict[str, str]:
    path = run_root / RERUNS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def with_absolute_data_root(cfg: ExperimentConfig) -> ExperimentConfig:
    """The data root as an absolute path: tasks are separate processes, and the cache key should not depend on
    the directory ``d2mtl run`` was started from."""
    root = cfg.ingest.data_root
    if store.is_remote(root):
        return cfg
    ingest = cfg.ingest.model_copy(update={"data_root": str(Path(root).resolve())})
    return cfg.model_copy(update={"ingest": ingest})


@contextlib.contextmanager
def store_keys_in_environment(cfg: ExperimentConfig) -> Iterator[None]:
    """Keys set in the config reach the task processes as AWS_* variables (never as pipeline parameters)."""
    keys = {
        "AWS_ACCESS_KEY_ID": cfg.store.access_key,
        "AWS_SECRET_ACCESS_KEY": cfg.store.secret_key.get_secret_value() if cfg.store.secret_key else None,
    }
    saved = {name: os.environ.get(name) for name in keys}
    os.environ.update({name: value for name, value in keys.items() if value})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def executed_tasks(run_dir: Path) -> dict[str, float | None]:
    """Tasks that ran in this run (folder relative to the run folder) -> their ``stage_seconds`` if logged."""
    tasks: dict[str, float | None] = {}
    for output in sorted(run_dir.rglob(EXECUTOR_OUTPUT)):
        name = output.parent.relative_to(run_dir).as_posix()
        artifacts = json.loads(output.read_text()).get("artifacts", {})
        seconds = [
            a.get("metadata", {}).get(STAGE_SECONDS)
            for listed in artifacts.values()
            for a in listed.get("artifacts", [])
        ]
        tasks[name] = next((s for s in seconds if s is not None), None)
    return tasks


def run(cfg: ExperimentConfig, rerun: str | None = None, from_run: str | None = None) -> LocalRun:
    """Run the pipeline locally; ``rerun``: recompute that stage and everything downstream of it, reusing this
    run root's cache, or with ``from_run`` the other stages' outputs that run published (to a local folder)."""
    from kfp import local
    from kfp.local import executor_input_utils

    run_root = Path(cfg.pipeline.run_root).resolve()
    run_root.mkdir(parents=True, exist_ok=True)
    tokens = load_tokens(run_root)
    reuse = compile_module.plan_rerun(cfg, rerun, from_run) if from_run else None
    if reuse is not None and store.is_remote(reuse.prefix):
        raise UserError(
            f"--from-run on this machine imports from a folder, not {reuse.prefix} (kfp.local does not "
            "download artifacts); use d2mtl submit for a cluster"
        )
    if rerun is not None and reuse is None:
        pipeline.check_stage(rerun, cfg.pipeline)
        tokens[rerun] = uuid.uuid4().hex[:12]
        store.write_text(str(run_root / RERUNS_FILE), json.dumps(tokens, indent=1, sort_keys=True))
        stages = pipeline.enabled_stages(cfg.pipeline)
        log.info("recomputing %s", ", ".join(s for s in stages if s in pipeline.downstream(rerun, stages)))
    cfg = with_absolute_data_root(cfg)
    run_id = f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"
    pipeline_func = pipeline.build(cfg, reuse=reuse, local=True, rerun_tokens=tokens)

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(run_root),
        enable_caching=cfg.pipeline.caching,
        raise_on_error=True,
    )
    run_dir = run_root / run_id
    start = time.perf_counter()
    plain_print = builtins.print  # kfp.local indents print() per task, racily across loop threads: restore it
    print(f"run {run_id}: kfp.local's whole output goes to {run_dir / RUN_LOG}", flush=True)
    # kfp.local names the run folder <pipeline name>-<timestamp>; name it by the run id instead: one id per run
    with (
        warnings.catch_warnings(),
        store_keys_in_environment(cfg),
        RunLog(run_dir / RUN_LOG, sys.stdout) as log_file,
        contextlib.redirect_stdout(log_file),
        kfp_records_to(log_file),
        mock.patch.object(executor_input_utils, "get_local_pipeline_resource_name", lambda name: run_id),
    ):
        for pattern in _LOCAL_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        try:
            task = pipeline_func(run_id=run_id)
        except RuntimeError as err:
            raise UserError(f"the pipeline failed: {_ANSI.sub('', str(err))} (its log: {run_dir / RUN_LOG})") from None
        finally:
            builtins.print = plain_print
    wall = time.perf_counter() - start
    executed = executed_tasks(run_dir)
    prefix = cfg.pipeline.publish_prefix
    result = LocalRun(
        run_id=run_id,
        run_dir=run_dir,
        model=task.outputs["model"].path,
        report=store.join(task.outputs["evaluation"].path, layout.EVAL_REPORT_HTML),
        wall_seconds=wall,
        executed=list(executed),
        stage_seconds={k: v for k, v in executed.items() if v is not None},
        published=store.join(prefix, run_id) if prefix else None,
    )
    # `d2mtl predict` and `d2mtl export` default to this run's final model
    store.write_text(
        str(run_root / layout.LATEST_RUN),
        json.dumps(
            {"run_id": run_id, "model": result.model, "report": result.report, "published": result.published}, indent=1
        ),
    )
    return result


def summary(result: LocalRun) -> str:
    ran = f"{len(result.executed)} task(s) ran" if result.executed else "every task came from the cache"
    lines = [
        f"pipeline finished in {result.wall_seconds:.1f} s; {ran}",
        f"  log:         {result.run_dir / RUN_LOG}",
        f"  report:      {result.report}",
        f"  final model: {result.model}",
    ]
    if result.published:
        lines.append(f"  published:   {result.published}/<stage>/...")
    return "\n".join(lines)
