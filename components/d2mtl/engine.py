"""The training engine shared by the teacher, the single-task baselines and the student.

``setup_run(cfg)``, then ``Trainer(cfg, index, out, build_model(cfg)).fit()`` runs: LR range test (unless resumed
or fixed), then epochs of ``train_one_epoch`` + ``evaluate`` on val with the plateau rule, checkpointing to ``out``
every epoch and every ``cfg.checkpoint_every`` steps, and finally writes the model folder (weights, card, metrics,
curves). When ``out`` already holds a checkpoint the run resumes from it: model, optimiser, scheduler, task weighting,
sampler position, running loss sums and RNG states, so a KFP retry continues, not restarts.
Checkpoints hold only tensors and plain values: ``torch.load(..., weights_only=True)`` reads them.

Under ``torchrun`` (``distributed.launched``) the network trains as DistributedDataParallel, one process per
GPU: each rank takes its share of every global batch, task losses are divided by the global batch's label
counts, validation is split between the ranks and summed, and rank 0 alone writes checkpoints and the model
folder (docs/scaling.md).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import pickle
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from d2mtl import layout, plots, store
from d2mtl.contracts import PseudoLabelUse, Sources, TrainingData, TrainingRecord
from d2mtl.data import EpochSampler, FaceDataset, FaceIndex, make_loader, normalize
from d2mtl.devices import use_threads
from d2mtl.distributed import Distributed
from d2mtl.errors import UserError
from d2mtl.losses import MaskedTaskLoss, TaskWeighting, dataset_share_weights, interval_distance
from d2mtl.lr import DynamicLR, range_test
from d2mtl.models import MultiTaskNet, save_model
from d2mtl.tasks import TASKS

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "d2mtl-checkpoint/1"
START_OVER = "Use another --out, or --restart to train from the start"
# Fields that change how a run executes, not what it computes: a resume may change them.
EXECUTION_FIELDS = {"progress", "num_workers", "threads", "device", "eval_batch_size", "checkpoint_every"}

OPTIMIZERS = {
    "adamw": lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr.lr, weight_decay=cfg.weight_decay),
    "sgd": lambda groups, cfg: torch.optim.SGD(
        groups, lr=cfg.lr.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    ),
}


def setup_run(cfg) -> None:
    """Threads, determinism and the seed, before the network is built (its initial weights use the seed)."""
    use_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)


def param_groups(net: torch.nn.Module, weighting: TaskWeighting) -> list[dict]:
    """Weight decay on weight matrices / kernels only; none on biases, norms and uncertainty parameters."""
    decay, no_decay = [], []
    for param in net.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    no_decay += [p for p in weighting.parameters() if p.requires_grad]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def config_fingerprint(cfg) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in EXECUTION_FIELDS}


@dataclass
class Progress:
    """Everything about where a run stands, besides the module / optimiser states."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches done in the current epoch (the sampler position)
    global_step: int = 0
    peak_lr: float | None = None
    range_test: dict | None = None
    history: list[dict] = field(default_factory=list)  # one entry per completed epoch
    lr_trace: list[float] = field(default_factory=list)  # the rate of every optimiser step
    loss_sums: dict[str, float] = field(default_factory=dict)  # this epoch's train-loss sums per task
    loss_counts: dict[str, int] = field(default_factory=dict)  # ... and the batches they came from
    train_seconds: float = 0.0


def task_weighting(cfg, train_summary: dict, tasks: tuple[str, ...]) -> tuple[str, dict[str, float]]:
    """(TaskWeighting mode, fixed weights): dataset_share is fixed weights computed from the train data."""
    if cfg.weighting != "dataset_share":
        return cfg.weighting, cfg.task_weights
    shares = dataset_share_weights(train_summary, tasks)
    return "fixed", {task: shares[task] * cfg.task_weights.get(task, 1.0) for task in tasks}


class Trainer:
    """One training run of a MultiTaskNet on a FaceIndex, writing to the model folder ``out``; one of
    ``dist.world_size`` data-parallel processes."""

    def __init__(
        self,
        cfg,
        index: FaceIndex,
        out: str,
        net: MultiTaskNet,
        role: str = "teacher",
        sources: Sources | None = None,
        pseudo_labels: dict[str, PseudoLabelUse] | None = None,
        dist: Distributed | None = None,
        inputs: dict[str, str] | None = None,
    ):
        self.cfg, self.index, self.out, self.role = cfg, index, out, role
        self.inputs = inputs or {}  # input name -> content hash (contracts.content_hash): a resume needs the same
        self.sources, self.pseudo_labels = sources, pseudo_labels  # for the model card
        self.dist = dist or Distributed()
        self.device = self.dist.device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.memory_format = torch.channels_last if self.cuda else torch.contiguous_format
        if self.dist.enabled and self.cuda:  # BatchNorm statistics of the global batch (torch syncs on GPUs only)
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        self.net = net.to(self.device, memory_format=self.memory_format)
        self.model: torch.nn.Module = self.net  # what training steps call: the DDP wrapper under torchrun
        if self.dist.enabled:
            # A task with no label in a global batch leaves its head without a gradient on every rank.
            self.model = DistributedDataParallel(
                self.net, device_ids=[self.device] if self.cuda else None, find_unused_parameters=True
            )
            torch.manual_seed(self.dist.seed(cfg.seed))  # the same weights everywhere, dropout of each rank's own
        self.tasks = net.tasks
        self.loss_fn = MaskedTaskLoss(self.tasks, cfg.model.age_head, cfg.age_sigma, cfg.age_l1_weight).to(self.device)
        self.train_rows, self.val_rows, self.test_rows = (index.rows(s) for s in ("train", "val", "test"))
        self.weighting = TaskWeighting(
            self.tasks,
            *task_weighting(cfg, index.summary(self.train_rows), self.tasks),
            cfg.dwa_temperature,
            cfg.model.age_head,
        ).to(self.device)
        if not len(self.train_rows):
            raise UserError(f"no train faces labelled for {', '.join(self.tasks)}: check the label table and tasks")
        if 0 < cfg.shard_window < len(index.shards):
            log.warning(
                "shard_window %d < %d shards: each batch mixes only a window of shards; unbiased only when "
                "the face table's rows are in random order",
                cfg.shard_window,
                len(index.shards),
            )
        if index.label_mismatch:
            log.warning("%s", index.label_mismatch)
        self.train_data = FaceDataset(index, cfg.model.input_size, cfg.augment, cfg.shard_window)
        self.eval_data = FaceDataset(index, cfg.model.input_size, None, cfg.shard_window)
        self.sampler = EpochSampler(
            index,
            self.train_rows,
            cfg.batch_size,
            cfg.seed,
            cfg.mix,
            cfg.epoch_samples,
            cfg.shard_window,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            temperature=cfg.mix_temperature,
        )
        if self.sampler.dropped:
            log.info(
                "%d of %d samples per epoch left out: the last batch would have fewer than 2 per process",
                self.sampler.dropped,
                self.sampler.samples,
            )
        self.train_loader = make_loader(
            self.train_data, self.sampler, cfg.num_workers, pin_memory=self.cuda, persistent=True
        )
        self.optimizer = OPTIMIZERS[cfg.optimizer](param_groups(self.net, self.weighting), cfg)
        self.scheduler: DynamicLR | None = None
        self.progress = Progress()
        self.checkpoint_uri = store.join(out, layout.CHECKPOINT_FILE)

    # ---- one step / one epoch / evaluation ----------------------------------------------------------

    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = normalize(batch["image"], self.cfg.model.mean, self.cfg.model.std, self.device, self.memory_format)
        targets = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k not in ("image", "row")}
        return images, targets

    def _forward(self, module: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            return module(images)

    def _global_label_counts(self, targets: dict[str, torch.Tensor]) -> dict[str, int] | None:
        """Labels per task in the global batch (None for a single process: the batch is global)."""
        if not self.dist.enabled:
            return None
        local = torch.stack([(targets[f"{task}_weight"] > 0).sum() for task in self.tasks])
        return dict(zip(self.tasks, self.dist.sum(local).tolist(), strict=True))

    def train_step(self, batch: dict[str, torch.Tensor], total_of=None) -> dict[str, torch.Tensor]:
        """One optimiser step; returns the detached per-task losses of the global batch."""
        self.model.train()
        images, targets = self._inputs(batch)
        # Each rank's share of the global-batch mean; DDP averages gradients, so scale by the world size
        # to get the gradient of the global mean.
        shares = self.loss_fn(self._forward(self.model, images), targets, self._global_label_counts(targets))
        scaled = {task: share * self.dist.world_size for task, share in shares.items()} if self.dist.enabled else shares
        total = (total_of or self.weighting)(scaled)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.dist.average_gradients(self.weighting.parameters())
        self.optimizer.step()
        if not self.dist.enabled:
            return {task: loss.detach() for task, loss in shares.items()}
        return dict(zip(shares, self.dist.sum(torch.stack([loss.detach() for loss in shares.values()])), strict=True))

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """Train from the sampler position to the end of ``epoch``; returns its mean loss per task."""
        progress = self.progress
        self.sampler.set_epoch(epoch, progress.step_in_epoch)
        sums = {t: torch.tensor(v, device=self.device) for t, v in progress.loss_sums.items()}
        counts = dict(progress.loss_counts)
        with tqdm(
            total=len(self.sampler),
            initial=progress.step_in_epoch,
            desc=f"{self.role} epoch {epoch + 1}",
            disable=not (self.cfg.progress and self.dist.is_main),
            mininterval=2,
            leave=False,
        ) as bar:
            started = time.perf_counter()
            for batch in self.train_loader:
                progress.lr_trace.append(self.optimizer.param_groups[0]["lr"])
                for task, loss in self.train_step(batch).items():
                    sums[task] = sums.get(task, 0) + loss
                    counts[task] = counts.get(task, 0) + 1
                self.scheduler.step()
                progress.step_in_epoch += 1
                progress.global_step += 1
                bar.update()
                if self.cfg.checkpoint_every and progress.global_step % self.cfg.checkpoint_every == 0:
                    progress.loss_sums, progress.loss_counts = {t: float(v) for t, v in sums.items()}, dict(counts)
                    progress.train_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save_checkpoint()
                if bar.n % 25 == 0:
                    bar.set_postfix({t: f"{float(sums[t]) / counts[t]:.3f}" for t in sums})
        progress.train_seconds += time.perf_counter() - started
        return {t: float(sums[t]) / counts[t] for t in sums}

    @torch.no_grad()
    def evaluate(self, rows: np.ndarray) -> dict:
        """Masked loss per task and metrics on ``rows``: age MAE (exact ages) and interval accuracy (age
        groups), accuracy per classification task, the count of labels behind each.
        Under DDP each rank scores its share of ``rows`` with rank 0's model, and the sums are added up."""
        self.net.eval()
        if not len(rows):
            return {}
        self.dist.broadcast_buffers(self.net)
        sums: dict[str, float] = {}
        share = self.dist.split(rows)  # ascending rows: each rank reads its own run of shards
        batches = (
            make_loader(
                self.eval_data,
                EpochSampler(self.index, share, self.cfg.eval_batch_size, self.cfg.seed, shuffle=False),
                self.cfg.num_workers,
                pin_memory=self.cuda,
            )
            if len(share)
            else []
        )
        for batch in batches:
            images, targets = self._inputs(batch)
            outputs = self._forward(self.net, images)
            for task, loss in self.loss_fn(outputs, targets).items():
                present = targets[f"{task}_weight"] > 0
                _add(sums, f"{task}_loss", float(loss) * int(present.sum()))
                _add(sums, f"{task}_n", int(present.sum()))
                self._score(task, outputs[task][present], {k: v[present] for k, v in targets.items()}, sums)
        sums = self.dist.sum_dict(sums)
        metrics = {}
        for task in self.tasks:
            count = sums.get(f"{task}_n", 0)
            if not count:
                continue
            metrics[f"{task}_loss"] = sums[f"{task}_loss"] / count
            metrics[f"{task}_n"] = count
            if TASKS[task].kind == "classification":
                metrics[f"{task}_acc"] = sums[f"{task}_correct"] / count
            else:
                for name, n_key in (("mae", "exact_n"), ("interval_acc", "interval_n")):
                    if sums.get(f"{task}_{n_key}"):
                        metrics[f"{task}_{name}"] = sums[f"{task}_{name}"] / sums[f"{task}_{n_key}"]
        losses = [metrics[f"{t}_loss"] for t in self.tasks if f"{t}_loss" in metrics]
        metrics["loss_mean"] = float(np.mean(losses)) if losses else math.nan
        return metrics

    def _score(self, task: str, output: torch.Tensor, targets: dict[str, torch.Tensor], sums: dict) -> None:
        if TASKS[task].kind == "classification":
            _add(sums, f"{task}_correct", int((output.argmax(dim=1) == targets[task]).sum()))
            return
        predicted = self.net.age_distribution(output)[0] if self.net.spec.age_head == "dex" else output.float()
        low, high = targets[f"{task}_low"], targets[f"{task}_high"]
        exact = low == high
        _add(sums, f"{task}_mae", float((predicted[exact] - low[exact]).abs().sum()))
        _add(sums, f"{task}_exact_n", int(exact.sum()))
        inside = interval_distance(predicted[~exact], low[~exact], high[~exact]) == 0
        _add(sums, f"{task}_interval_acc", int(inside.sum()))
        _add(sums, f"{task}_interval_n", int((~exact).sum()))

    # ---- learning rate ------------------------------------------------------------------------------

    def find_peak_lr(self) -> float:
        """LR range test on a scratch copy of the state (restored afterwards), or the configured rate."""
        lr_cfg = self.cfg.lr
        if lr_cfg.schedule == "fixed" or not lr_cfg.range_test:
            return lr_cfg.lr
        saved = copy.deepcopy((self.net.state_dict(), self.optimizer.state_dict(), self.weighting.state_dict()))
        batches = self._cycle_batches()

        def step(rate: float) -> float:
            for group in self.optimizer.param_groups:
                group["lr"] = rate
            losses = self.train_step(next(batches), total_of=lambda found: sum(found.values()))
            return float(sum(losses.values()))

        result = range_test(step, lr_cfg)
        self.net.load_state_dict(saved[0])
        self.optimizer.load_state_dict(saved[1])
        self.weighting.load_state_dict(saved[2])
        self.progress.range_test = result.to_dict()
        log.info(
            "LR range test: loss lowest at %.2e -> peak rate %.2e%s",
            result.best_lr,
            result.peak,
            " (fallback)" if result.fallback else "",
        )
        return result.peak

    def _cycle_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Train batches from plans of their own (negative epochs), through the training loader."""
        epoch = -1
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.train_loader
            epoch -= 1

    def _make_scheduler(self) -> DynamicLR:
        steps = len(self.sampler)
        return DynamicLR(self.optimizer, self.cfg.lr, self.progress.peak_lr, steps * self.cfg.epochs, steps)

    # ---- checkpoints ----------------------------------------------------------------------------------

    def _rng_states(self) -> dict:
        """The RNG states to checkpoint: this process's; under DDP also every rank's (gathered: a collective)."""
        if not self.dist.enabled:
            rng = {"torch": torch.get_rng_state()}
            if self.cuda:
                rng["cuda"] = torch.cuda.get_rng_state_all()
            return rng
        own = {"torch": torch.get_rng_state()}
        if self.cuda:
            own["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"torch": own["torch"], "ranks": self.dist.gather(own)}

    def _restore_rng_states(self, rng: dict) -> None:
        ranks = rng.get("ranks")
        if not self.dist.enabled:
            torch.set_rng_state(rng["torch"])
            if self.cuda and "cuda" in rng:
                torch.cuda.set_rng_state_all(rng["cuda"])
        elif ranks and len(ranks) == self.dist.world_size:
            own = ranks[self.dist.rank]
            torch.set_rng_state(own["torch"])
            if self.cuda and "cuda" in own:
                torch.cuda.set_rng_state(own["cuda"], self.device)
        else:  # saved by another number of processes: fresh per-rank streams
            torch.manual_seed(self.dist.seed(self.cfg.seed + self.progress.global_step))

    def save_checkpoint(self) -> None:
        """Every rank calls this; rank 0 writes, the others wait until the checkpoint is complete."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": json.dumps(config_fingerprint(self.cfg), sort_keys=True),
            "inputs": json.dumps(self.inputs, sort_keys=True),
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "weighting": self.weighting.state_dict(),
            "progress": asdict(self.progress),
            "rng": self._rng_states(),
        }
        if self.dist.is_main:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            store.write_bytes(self.checkpoint_uri, buffer.getvalue())
        self.dist.barrier()

    def load_checkpoint(self) -> bool:
        """Resume from ``out``'s checkpoint when there is one; False when there is none."""
        if not store.exists(self.checkpoint_uri):
            return False
        try:
            state = torch.load(io.BytesIO(store.read_bytes(self.checkpoint_uri)), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            # torch's message suggests weights_only=False, i.e. running whatever the file holds: never pass that on
            raise UserError(
                f"{self.checkpoint_uri}: not a d2mtl checkpoint (it holds more than tensors and plain "
                f"values, or is damaged: {type(err).__name__}); it was not loaded. {START_OVER}"
            ) from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{self.checkpoint_uri}: not a {CHECKPOINT_FORMAT} checkpoint. {START_OVER}")
        changed = _differing(json.loads(state["config"]), config_fingerprint(self.cfg))
        if changed:
            raise UserError(
                f"{self.out} holds a checkpoint of a run with other settings ({', '.join(changed)}). {START_OVER}"
            )
        changed = _differing(json.loads(state.get("inputs", "{}")), self.inputs)
        if changed:
            raise UserError(
                f"{self.out} holds a checkpoint of a run on other inputs ({', '.join(changed)} differ). {START_OVER}"
            )
        self.net.load_state_dict(state["model"])
        self.weighting.load_state_dict(state["weighting"])
        self.progress = Progress(**state["progress"])
        self.scheduler = self._make_scheduler()  # sets the first step's rates: the optimiser state comes after
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._restore_rng_states(state["rng"])
        log.info(
            "checkpoint at %s: %d of %d epochs done, then %d of %d steps",
            self.out,
            self.progress.epoch,
            self.cfg.epochs,
            self.progress.step_in_epoch,
            len(self.sampler),
        )
        return True

    # ---- the run --------------------------------------------------------------------------------------

    def fit(self, restart: bool = False) -> dict:
        """Train (or resume, or find the run finished), write the model folder, return the results.
        ``restart``: discard ``out``'s checkpoint first and train from the start."""
        if restart and self.dist.is_main:
            store.delete(self.checkpoint_uri)
        self.dist.barrier()
        resumed = self.load_checkpoint()
        if (
            resumed
            and self.progress.epoch >= self.cfg.epochs
            and store.exists(store.join(self.out, layout.TRAIN_METRICS))
        ):
            log.info("%s: training already finished; keeping its outputs", self.out)
            return json.loads(store.read_text(store.join(self.out, layout.TRAIN_METRICS)))["result"]
        if not resumed:
            self.progress.peak_lr = self.find_peak_lr()
            self.scheduler = self._make_scheduler()
        log.info(
            "%s: %d train faces %s, %d batches/epoch, %d val, %d test, peak rate %.2e, device %s x %d",
            self.role,
            len(self.train_rows),
            self.index.summary(self.train_rows),
            len(self.sampler),
            len(self.val_rows),
            len(self.test_rows),
            self.progress.peak_lr,
            self.device,
            self.dist.world_size,
        )
        for epoch in range(self.progress.epoch, self.cfg.epochs):
            train_losses = self.train_one_epoch(epoch)
            started = time.perf_counter()
            val = self.evaluate(self.val_rows)
            lowered = self.scheduler.plateau_step(val.get("loss_mean", math.nan), epoch)
            self.weighting.end_epoch(train_losses)
            self.progress.history.append(
                {
                    "epoch": epoch + 1,
                    "train": train_losses,
                    "val": val,
                    "lr": self.progress.lr_trace[-1],
                    "plateau": lowered,
                    "task_weights": self.weighting.weights(),
                }
            )
            self.progress.epoch, self.progress.step_in_epoch = epoch + 1, 0
            self.progress.loss_sums, self.progress.loss_counts = {}, {}
            self.progress.train_seconds += time.perf_counter() - started
            log.info(
                "%s epoch %d/%d: train %s | val %s",
                self.role,
                epoch + 1,
                self.cfg.epochs,
                _fmt(train_losses),
                _fmt(val),
            )
            self.save_checkpoint()
        return self.finish()

    def finish(self) -> dict:
        """Test metrics, then the model folder (rank 0): weights + card, metrics.json, curves.png, lr_range.png."""
        test = self.evaluate(self.test_rows)
        progress = self.progress
        val = progress.history[-1]["val"] if progress.history else {}
        result = {
            "role": self.role,
            "out": self.out,
            "tasks": list(self.tasks),
            "epochs": progress.epoch,
            "peak_lr": progress.peak_lr,
            "train_seconds": round(progress.train_seconds, 1),
            "val": val,
            "test": test,
        }
        training = TrainingRecord(
            config=self.cfg.model_dump(mode="json"),
            data=TrainingData(
                train=self.index.summary(self.train_rows),
                val=self.index.summary(self.val_rows),
                test=self.index.summary(self.test_rows),
                unmatched_labels=self.index.unmatched_labels,
            ),
            faces=self.index.face_settings,
            inputs=self.inputs,
            epochs=progress.epoch,
            peak_lr=progress.peak_lr,
            train_seconds=result["train_seconds"],
            **({"processes": self.dist.world_size} if self.dist.enabled else {}),
        )
        if self.dist.is_main:
            self._write_model_folder(result, training)
        self.dist.barrier()
        log.info("%s done: val %s | test %s", self.role, _fmt(val), _fmt(test))
        return result

    def _write_model_folder(self, result: dict, training: TrainingRecord) -> None:
        progress = self.progress
        optional = {"sources": self.sources, "pseudo_labels": self.pseudo_labels}
        save_model(
            self.net,
            self.out,
            role=self.role,
            training=training,
            metrics={"val": result["val"], "test": result["test"]},
            **{name: value for name, value in optional.items() if value is not None},
        )
        lr_info = {
            "schedule": self.cfg.lr.schedule,
            "peak": progress.peak_lr,
            "range_test": progress.range_test,
            "plateaus": self.scheduler.lowered_at,
            "trace": progress.lr_trace,
        }
        store.write_text(
            store.join(self.out, layout.TRAIN_METRICS),
            json.dumps({"result": result, "history": progress.history, "lr": lr_info}, indent=1),
        )
        store.write_bytes(
            store.join(self.out, layout.TRAIN_CURVES), plots.training_curves(progress.history, progress.lr_trace)
        )
        if progress.range_test:
            store.write_bytes(store.join(self.out, layout.LR_RANGE_PLOT), plots.lr_range_test(progress.range_test))


def _differing(saved: dict, current: dict) -> list[str]:
    return sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))


def _add(sums: dict, key: str, value: float) -> None:
    sums[key] = sums.get(key, 0) + value


def _fmt(values: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items() if not k.endswith("_n"))
