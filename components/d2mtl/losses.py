"""Per-task losses masked by label presence, and the task weighting that sums them.

Each task's loss is the weighted sum of its per-sample losses over the samples that have its label
(weight > 0), divided by their count. A task with no label in the batch has no term at all: no
NaN, no gradient to its head. Weighting: fixed weights; uncertainty (Kendall, Gal, Cipolla,
"Multi-task learning using uncertainty to weigh losses", CVPR 2018), whose absent tasks are skipped;
dynamic weight average (Liu, Johns, Davison, "End-to-end multi-task learning with attention",
CVPR 2019).

Targets follow ``data.empty_targets``: per class task ``t`` (hard code, -1 none), ``t_probs`` + ``t_soft``
(soft targets: the loss is KL to those probabilities), ``t_weight``; age ``age_low``/``age_high`` (an
interval; equal for an exact age) and ``age_weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2mtl.tasks import AGE_MAX, AGE_MIN, TASKS


def soft_cross_entropy(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || predicted) per sample (B,); equals cross-entropy for one-hot targets."""
    return (torch.xlogy(target, target) - target * log_probs).sum(dim=1)


def interval_distance(value: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """L1 distance from ``value`` to [low, high] (0 inside): |value - age| for an exact age."""
    return F.relu(low - value) + F.relu(value - high)


def age_target_distribution(low: torch.Tensor, high: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, AGE_BINS) soft DEX target: the integer-age bins covering [low, high], smoothed by N(0, sigma)."""
    ages = torch.arange(AGE_MIN, AGE_MAX + 1, dtype=torch.float32, device=low.device)  # (K,)
    normal = torch.distributions.Normal(0.0, max(sigma, 1e-3))
    # mass of (uniform on [low - 0.5, high + 0.5]) * N(0, sigma) over each bin, up to a constant
    upper = normal.cdf(ages[None, :] - low[:, None] + 0.5)
    lower = normal.cdf(ages[None, :] - high[:, None] - 0.5)
    density = (upper - lower).clamp_min(0) + 1e-12
    return density / density.sum(dim=1, keepdim=True)


class MaskedTaskLoss(nn.Module):
    """Raw head outputs + targets -> {task: scalar loss} for the tasks present in the batch."""

    def __init__(
        self, tasks: tuple[str, ...], age_head: str = "dex", age_sigma: float = 2.0, age_l1_weight: float = 0.1
    ):
        super().__init__()
        self.tasks, self.age_head = tuple(tasks), age_head
        self.age_sigma, self.age_l1_weight = age_sigma, age_l1_weight
        self.register_buffer("age_values", torch.arange(AGE_MIN, AGE_MAX + 1, dtype=torch.float32), persistent=False)

    def per_sample(self, task: str, output: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss of each (present) sample; ``output`` and ``targets`` already restricted to present rows."""
        if TASKS[task].kind == "classification":
            log_probs = output.float().log_softmax(dim=1)
            hard = F.one_hot(targets[task].clamp_min(0), TASKS[task].num_classes).float()
            target = torch.where(targets[f"{task}_soft"][:, None], targets[f"{task}_probs"].float(), hard)
            return soft_cross_entropy(log_probs, target)
        low, high = targets[f"{task}_low"].float(), targets[f"{task}_high"].float()
        if self.age_head == "l1":
            return interval_distance(output.float(), low, high)
        log_probs = output.float().log_softmax(dim=1)
        expected = log_probs.exp() @ self.age_values
        divergence = soft_cross_entropy(log_probs, age_target_distribution(low, high, self.age_sigma))
        return divergence + self.age_l1_weight * interval_distance(expected, low, high)

    def forward(
        self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], counts: dict[str, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """``counts``: divide each task's sum by this count instead of the batch's own (under DDP, the global
        batch's), and keep a task with a count even where this batch has none of its labels (a 0 term)."""
        losses = {}
        for task in self.tasks:
            weight = targets[f"{task}_weight"]
            present = weight > 0
            count = int(present.sum()) if counts is None else counts.get(task, 0)
            if count == 0:
                continue
            rows = {k: v[present] for k, v in targets.items() if k == task or k.startswith(f"{task}_")}
            losses[task] = (weight[present].float() * self.per_sample(task, outputs[task][present], rows)).sum() / count
        return losses


def dataset_share_weights(train_summary: dict[str, dict[str, int]], tasks: tuple[str, ...]) -> dict[str, float]:
    """Fixed task weights that give each training dataset an equal share of the loss, split evenly among the
    tasks it labels: w_t = T * sum over the datasets d labelling t of 1 / (D * |tasks of d|), so the weights
    average 1. ``train_summary``: {dataset: {task: labelled train rows}} (FaceIndex.summary). With UTKFace (age,
    gender, race) and FER2013 (expression) it gives expression 3x each other task; a task no dataset labels gets 0.
    """
    labelled = {name: [t for t in tasks if counts.get(t, 0) > 0] for name, counts in train_summary.items()}
    labelled = {name: found for name, found in labelled.items() if found}
    weights = dict.fromkeys(tasks, 0.0)
    for found in labelled.values():
        for task in found:
            weights[task] += len(tasks) / (len(labelled) * len(found))
    return weights


class TaskWeighting(nn.Module):
    """Sums task losses: fixed weights, uncertainty weighting or dynamic weight average (dwa).

    Only the tasks present in ``losses`` enter the sum; an absent task's uncertainty parameter gets
    no gradient. dwa weights come from the last two epochs' mean losses (``end_epoch``); until two
    epochs are seen every weight is 1.
    """

    def __init__(
        self,
        tasks: tuple[str, ...],
        mode: str = "fixed",
        fixed: dict[str, float] | None = None,
        temperature: float = 2.0,
        age_head: str = "dex",
    ):
        super().__init__()
        if mode not in ("fixed", "uncertainty", "dwa"):
            raise ValueError(f"unknown weighting {mode!r}; known: fixed, uncertainty, dwa")
        self.tasks, self.mode, self.temperature = tuple(tasks), mode, temperature
        fixed = fixed or {}
        self.register_buffer("fixed", torch.tensor([float(fixed.get(t, 1.0)) for t in self.tasks]))
        # Kendall et al.: 1/sigma^2 L + log sigma for a softmax likelihood, 1/(2 sigma^2) L + log sigma for
        # a Gaussian/Laplace regression; with s = log sigma^2 these are exp(-s) L + s/2 and exp(-s) L / 2 + s/2.
        self.register_buffer(
            "likelihood_scale",
            torch.tensor([0.5 if TASKS[t].kind == "regression" and age_head == "l1" else 1.0 for t in self.tasks]),
        )
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)), requires_grad=mode == "uncertainty")
        self.register_buffer("epoch_losses", torch.zeros(2, len(self.tasks)))  # [previous, last] epoch means
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def weights(self) -> dict[str, float]:
        """The current weight per task (uncertainty: exp(-s) times the likelihood scale)."""
        if self.mode == "uncertainty":
            values = self.likelihood_scale * torch.exp(-self.log_vars.detach())
        elif self.mode == "dwa":
            values = self._dwa()
        else:
            values = self.fixed
        return {t: float(v) for t, v in zip(self.tasks, values, strict=True)}

    def _dwa(self) -> torch.Tensor:
        if int(self.epochs_seen) < 2:
            return torch.ones(len(self.tasks), device=self.fixed.device)
        ratio = self.epoch_losses[1] / self.epoch_losses[0].clamp_min(1e-12)
        return len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        present = [i for i, t in enumerate(self.tasks) if t in losses]
        if not present:
            raise ValueError("no task has a label in this batch")
        stacked = torch.stack([losses[self.tasks[i]] for i in present])
        index = torch.tensor(present, device=stacked.device)
        if self.mode == "uncertainty":
            s = self.log_vars[index]
            return (self.likelihood_scale[index] * torch.exp(-s) * stacked + s / 2).sum()
        weights = self._dwa()[index] if self.mode == "dwa" else self.fixed[index]
        return (weights.to(stacked.device) * stacked).sum()

    def end_epoch(self, mean_losses: dict[str, float]) -> None:
        """Record an epoch's mean train loss per task (tasks not seen keep their last value)."""
        last = self.epoch_losses[1].clone()
        for i, task in enumerate(self.tasks):
            if task in mean_losses:
                last[i] = mean_losses[task]
        self.epoch_losses[0] = self.epoch_losses[1] if int(self.epochs_seen) else last
        self.epoch_losses[1] = last
        self.epochs_seen += 1
