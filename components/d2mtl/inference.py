"""The deployable graph: normalised faces in, every task's decoded outputs out, as one tuple of named tensors.

``predict.Analyzer`` and ``serve`` run it; ``export`` writes it as ONNX and TorchScript. The decoding (class
probabilities, DEX expected age and spread, the clamped l1 age) is ``MultiTaskNet.decode``; this graph adds the
age interval and fixes the order of the outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from d2mtl.errors import UserError
from d2mtl.models import MultiTaskNet
from d2mtl.tasks import AGE_MIN, TASKS

AGE_INTERVAL = 0.8  # central share of the age distribution reported as the interval: its 10th-90th percentile


def output_names(net: MultiTaskNet) -> tuple[str, ...]:
    """Names of ``InferenceModel``'s outputs, in order: per classification task its probabilities;
    for age the expected years, the interval bounds and the spread."""
    names: list[str] = []
    for task in net.tasks:
        if TASKS[task].kind == "classification":
            names.append(task)
        else:
            names += [task, f"{task}_low", f"{task}_high", f"{task}_std"]
    return tuple(names)


class InferenceModel(nn.Module):
    """Normalised faces (B, 3, S, S) -> a tuple of tensors named ``output_names(net)``, every task in one pass.

    Class tasks: probabilities (B, C). Age (B,) each: expected years; the ``(1 - interval) / 2`` and
    ``(1 + interval) / 2`` quantiles of the DEX distribution in whole years; its standard deviation. An l1 age
    head has no distribution: its interval is the point estimate and its spread 0.
    """

    def __init__(self, net: MultiTaskNet, age_interval: float = AGE_INTERVAL):
        super().__init__()
        if not 0 < age_interval < 1:
            raise UserError(f"age interval {age_interval} must be a share between 0 and 1, e.g. 0.8")
        self.net = net
        self.age_interval = age_interval
        self.output_names = output_names(net)
        quantiles = torch.tensor([(1 - age_interval) / 2, (1 + age_interval) / 2])
        self.register_buffer("quantiles", quantiles, persistent=False)

    def age_bounds(self, age_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first whole age whose DEX CDF reaches each of ``quantiles`` (B,), (B,)."""
        cdf = age_logits.float().softmax(dim=1).cumsum(dim=1)  # (B, AGE_BINS)
        below = cdf.unsqueeze(1) < self.quantiles.view(1, 2, 1)  # (B, 2, AGE_BINS)
        bounds = below.sum(dim=2).float() + AGE_MIN  # (B, 2)
        return bounds[:, 0], bounds[:, 1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(x)
        decoded = self.net.decode(out)
        results: list[torch.Tensor] = []
        for task in self.net.tasks:
            if TASKS[task].kind == "classification":
                results.append(decoded[task])
                continue
            years = decoded[task]
            low, high = self.age_bounds(out[task]) if self.net.spec.age_head == "dex" else (years, years)
            results += [years, low, high, decoded[f"{task}_std"]]
        return tuple(results)
