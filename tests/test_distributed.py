"""Data-parallel training: 2 CPU processes (gloo, launched as torchrun would) against one process with the
same global batch; sharded sampling; rank-0-only outputs; resume under 2 processes; the PyTorchJob manifest.

The network is a MobileNetV2 with every backbone stage frozen and no dropout: frozen BatchNorm layers use
their running statistics, so the two ranks compute exactly what one process computes. (Trainable
BatchNorm would normalise each rank's half batch by its own statistics: SyncBatchNorm, which the trainer
uses on GPUs, has no CPU implementation in torch.) The loss trajectories then agree to float rounding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from conftest import REPO, free_port, tiny_train_settings
from generated.tables import make_tiny_tables
from safetensors.torch import load_file

from d2mtl import distributed, layout, store
from d2mtl.config.train import TrainConfig
from d2mtl.data import EpochSampler, FaceIndex
from d2mtl.engine import Trainer
from d2mtl.errors import UserError
from d2mtl.stages import teacher

WORLD = 2
LOSS_RTOL = 1e-5  # measured: max relative difference ~1e-7 (summation order of the gradient all-reduce)


def frozen_config(**overrides) -> TrainConfig:
    fixed = {
        "model": {"weights": "none", "input_size": 32, "dropout": 0.0, "freeze_stages": 19},
        "epochs": 2,
        "checkpoint_every": 3,
        "deterministic": True,
        "weighting": "uncertainty",
        "lr": {"range_steps": 6, "plateau_patience": 1},
    }
    return TrainConfig(**tiny_train_settings(fixed, overrides))


@contextmanager
def recording(interrupt_at: int | None = None) -> Iterator[tuple[list[dict], list[str]]]:
    """Patch the trainer and the store of this process: per-step losses and the files written are appended
    to the yielded lists; the ``interrupt_at``-th training step raises KeyboardInterrupt."""
    losses, writes = [], []
    train_step, write_bytes, write_text = Trainer.train_step, store.write_bytes, store.write_text

    def recorded_step(self, batch, total_of=None):
        if total_of is None:  # a training step, not the LR range test
            if len(losses) + 1 == interrupt_at:
                raise KeyboardInterrupt
            found = train_step(self, batch, total_of)
            losses.append({task: float(value) for task, value in found.items()})
            return found
        return train_step(self, batch, total_of)

    def recorded(write):
        def call(uri, *args, **kwargs):
            writes.append(uri)
            return write(uri, *args, **kwargs)

        return call

    Trainer.train_step = recorded_step
    store.write_bytes, store.write_text = recorded(write_bytes), recorded(write_text)
    try:
        yield losses, writes
    finally:
        Trainer.train_step, store.write_bytes, store.write_text = train_step, write_bytes, write_text


def rank_worker(rank: int, tables: dict[str, str], runs: list[tuple[str, int, int | None]], record_dir: str) -> None:
    """One torchrun-like process: the environment torchrun sets, then the teacher stage for each run."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    report = {}
    for out, port, interrupt_at in runs:
        os.environ["MASTER_PORT"] = str(port)
        with recording(interrupt_at) as (losses, writes), suppress(KeyboardInterrupt):
            teacher.run(frozen_config(), faces=tables["faces"], labels=tables["labels"], out=out)
        report.setdefault(out, []).append({"losses": losses, "writes": writes})
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Straight, interrupted and resumed 2-process runs, and the 1-process reference, on one tiny table."""
    root = tmp_path_factory.mktemp("ddp")
    tables = make_tiny_tables(root / "ingest")
    straight, resumed = str(root / "straight"), str(root / "resumed")
    runs = [(straight, free_port(), None), (resumed, free_port(), 4), (resumed, free_port(), None)]
    mp.start_processes(rank_worker, args=(tables, runs, str(root)), nprocs=WORLD, start_method="spawn")
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]

    with recording() as (single_losses, _):
        teacher.run(frozen_config(), faces=tables["faces"], labels=tables["labels"], out=str(root / "single"))
    return {"root": root, "ranks": ranks, "single": single_losses, "straight": straight, "resumed": resumed}


@pytest.mark.timeout(600)
def test_two_processes_follow_the_single_process_loss_trajectory(two_process_runs):
    runs = two_process_runs
    straight = [rank[runs["straight"]][0]["losses"] for rank in runs["ranks"]]
    single = runs["single"]
    assert straight[0] == straight[1]  # every rank logs the all-reduced global-batch losses
    assert len(straight[0]) == len(single) == 10 and set(single[0]) == {"age", "gender", "race", "expression"}
    for step, (ddp, one) in enumerate(zip(straight[0], single, strict=True)):
        assert ddp.keys() == one.keys(), step
        assert [ddp[t] for t in one] == pytest.approx([one[t] for t in one], rel=LOSS_RTOL), step
    ddp_weights = load_file(Path(runs["straight"], layout.WEIGHTS_FILE))
    single_weights = load_file(runs["root"] / "single" / layout.WEIGHTS_FILE)
    assert all(torch.allclose(ddp_weights[k], single_weights[k], rtol=1e-4, atol=1e-6) for k in single_weights)
    metrics = [
        json.loads(Path(folder, layout.TRAIN_METRICS).read_text())
        for folder in (runs["straight"], runs["root"] / "single")
    ]
    assert metrics[0]["lr"]["peak"] == pytest.approx(metrics[1]["lr"]["peak"])  # same range-test decision
    assert metrics[0]["history"][-1]["val"] == pytest.approx(metrics[1]["history"][-1]["val"], rel=1e-4)


@pytest.mark.timeout(600)
def test_only_rank_zero_writes_and_a_two_process_run_resumes_exactly(two_process_runs):
    runs = two_process_runs
    rank0, rank1 = runs["ranks"]
    assert not any(run["writes"] for run in rank1[runs["straight"]] + rank1[runs["resumed"]])
    written = {Path(uri).name for uri in rank0[runs["straight"]][0]["writes"]}
    assert written >= {layout.CHECKPOINT_FILE, layout.WEIGHTS_FILE, layout.MODEL_CARD, layout.TRAIN_METRICS}

    interrupted, finished = rank0[runs["resumed"]]
    assert len(interrupted["losses"]) == 3 and len(finished["losses"]) == 7  # checkpoint at step 3, then on
    assert interrupted["losses"] + finished["losses"] == rank0[runs["straight"]][0]["losses"]
    straight = load_file(Path(runs["straight"], layout.WEIGHTS_FILE))
    resumed = load_file(Path(runs["resumed"], layout.WEIGHTS_FILE))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    state = torch.load(Path(runs["resumed"], layout.CHECKPOINT_FILE), weights_only=True)
    assert len(state["rng"]["ranks"]) == WORLD and state["progress"]["epoch"] == 2


# ---- without processes ------------------------------------------------------------------------------


def test_ranks_share_each_global_batch(tiny_tables):
    index = FaceIndex.load(tiny_tables["faces"], tiny_tables["labels"], ("gender", "expression"))
    rows = index.rows("train")
    single = EpochSampler(index, rows, 8, seed=1)
    shares = [EpochSampler(index, rows, 8, seed=1, rank=r, world_size=WORLD) for r in range(WORLD)]
    for sampler in [single, *shares]:
        sampler.set_epoch(1, start=1)
    batches = [list(s) for s in shares]
    assert all([len(items) for items in b] == [4, 4, 4, 2] for b in batches)  # 36 rows: the last batch of 4 split
    assert [a + b for a, b in zip(*batches, strict=True)] == list(
        single
    )  # rank 0 then rank 1: the single process's batch
    small = EpochSampler(index, rows[:5], 8, seed=0, rank=1, world_size=WORLD)  # one partial batch of 5
    assert len(next(iter(small))) == 2
    with pytest.raises(UserError, match="multiple of the 3 training processes"):
        EpochSampler(index, rows, 8, seed=0, world_size=3)


def test_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed.launched("cpu") as place:
        assert place == distributed.Distributed() and not place.enabled and place.is_main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "6")
    with pytest.raises(UserError, match="outside WORLD_SIZE 4"):
        distributed.from_env()
    place = distributed.Distributed(rank=1, world_size=4, local_rank=1)
    assert place.device("cpu") == torch.device("cpu") and not place.is_main
    assert place.split(np.arange(10)).tolist() == [3, 4, 5]
    assert place.seed(0) != distributed.Distributed(rank=0, world_size=4).seed(0)


def test_pytorchjob_manifest_runs_torchrun_on_the_cuda_image():
    from d2mtl.config import load_experiment

    job = yaml.safe_load((REPO / "manifests" / "training" / "pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    pipeline = load_experiment("gpu").pipeline
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    for replica in specs.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the operator finds the training container by this name
        assert "d2mtl-train-cuda" in container["image"]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        command = container["command"] + container["args"]
        assert command[:4] == [
            "torchrun",
            f"--nproc-per-node={gpus}",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
        ]
        assert command[4:7] == ["-m", "d2mtl.cli", "teacher"] and job["spec"]["nprocPerNode"] == str(gpus)
        secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
        assert secrets == {pipeline.secret_name}
        (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert pod["tolerations"] == [t.model_dump(exclude_none=True) for t in pipeline.gpu_tolerations]
        assert pod["nodeSelector"] == pipeline.gpu_node_selector
