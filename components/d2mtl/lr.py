"""The dynamic learning rate: an LR range test picks the peak, a one-cycle or cyclical schedule runs
from it, and a plateau rule lowers every later rate when validation stops improving.

LR range test: Smith, "Cyclical learning rates for training neural networks", WACV 2017; one-cycle:
Smith & Topin, "Super-convergence", 2018. ``schedule: fixed`` is the plain constant rate (the ablation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class RangeTest:
    """The rates tried, the (smoothed) losses seen and the peak picked."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    best_lr: float  # rate at the smoothed-loss minimum
    peak: float  # the chosen peak rate (best_lr / divisor)
    fallback: bool = False  # True when the loss never fell and cfg.lr was used instead

    def to_dict(self) -> dict:
        return asdict(self)


def range_test(step: Callable[[float], float], cfg, smoothing: float = 0.9, diverge: float = 4.0) -> RangeTest:
    """Run ``step(lr) -> loss`` at exponentially increasing rates (``cfg`` is an LRConfig).

    Stops when the smoothed loss exceeds ``diverge`` x its minimum (or is not finite). The caller
    restores the model afterwards. Falls back to ``cfg.lr`` when the loss never fell.
    """
    steps = max(cfg.range_steps, 2)
    ratio = (cfg.range_end / cfg.range_start) ** (1 / (steps - 1))
    lrs, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    for i in range(steps):
        lr = cfg.range_start * ratio**i
        loss = step(lr)
        if not math.isfinite(loss):
            break
        average = smoothing * average + (1 - smoothing) * loss
        value = average / (1 - smoothing ** (i + 1))  # bias-corrected
        lrs.append(lr), losses.append(loss), smoothed.append(value)
        best = min(best, value)
        if i > steps // 10 and value > diverge * best:
            break
    if not smoothed:
        return RangeTest(lrs, losses, smoothed, cfg.lr, cfg.lr, fallback=True)
    best_i = min(range(len(smoothed)), key=smoothed.__getitem__)
    if best_i == 0 or smoothed[best_i] >= smoothed[0]:
        log.warning("LR range test: the loss never fell; using the configured rate %.2e", cfg.lr)
        return RangeTest(lrs, losses, smoothed, lrs[best_i], cfg.lr, fallback=True)
    return RangeTest(lrs, losses, smoothed, lrs[best_i], lrs[best_i] / cfg.range_divisor)


def _cosine(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0))) / 2


class DynamicLR(torch.optim.lr_scheduler.LRScheduler):
    """Per-step rate = scale x shape(step) x peak; ``scale`` drops by plateau_factor on each plateau.

    one_cycle: cosine rise from peak/start_div over the warmup share, cosine fall to peak/final_div.
    cyclic: triangular cycles of cycle_epochs between peak/start_div and peak, the amplitude halving
    each cycle ("triangular2"). fixed: cfg.lr throughout, no plateau rule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg, peak: float, total_steps: int, steps_per_epoch: int):
        self.schedule, self.peak = cfg.schedule, peak if cfg.schedule != "fixed" else cfg.lr
        self.total_steps, self.steps_per_epoch = max(total_steps, 1), max(steps_per_epoch, 1)
        self.warmup, self.start_div, self.final_div = cfg.warmup, cfg.start_div, cfg.final_div
        self.cycle_steps = max(1, round(cfg.cycle_epochs * self.steps_per_epoch))
        self.patience, self.factor = cfg.plateau_patience, cfg.plateau_factor
        self.scale, self.best, self.bad_epochs = 1.0, math.inf, 0
        self.lowered_at: list[int] = []  # epochs after which the plateau rule lowered the rate
        super().__init__(optimizer)

    def shape(self, step: int) -> float:
        """The schedule's multiplier of the peak rate at ``step``."""
        if self.schedule == "fixed":
            return 1.0
        low = 1 / self.start_div
        if self.schedule == "cyclic":
            cycle, position = divmod(step, self.cycle_steps)
            half = self.cycle_steps / 2
            triangle = 1 - abs(position - half) / half
            return low + (1 - low) * triangle / 2**cycle
        warm = max(1, round(self.warmup * self.total_steps))
        if step < warm:
            return _cosine(low, 1.0, step / warm)
        return _cosine(1.0, 1 / self.final_div, (step - warm) / max(1, self.total_steps - warm))

    def get_lr(self) -> list[float]:
        rate = self.scale * self.shape(self.last_epoch) * self.peak
        return [rate for _ in self.optimizer.param_groups]

    def plateau_step(self, val_loss: float, epoch: int) -> bool:
        """After an epoch's validation: lower every later rate when ``val_loss`` has not improved for
        ``patience`` epochs. Returns True when it lowered the rate."""
        if self.schedule == "fixed" or self.patience <= 0 or not math.isfinite(val_loss):
            return False
        if val_loss < self.best * (1 - 1e-4):
            self.best, self.bad_epochs = val_loss, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs < self.patience:
            return False
        self.scale *= self.factor
        self.bad_epochs = 0
        self.lowered_at.append(epoch)
        for group, rate in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = rate
        log.info("plateau after epoch %d: learning rates scaled by %.3g (now x%.3g)", epoch, self.factor, self.scale)
        return True
