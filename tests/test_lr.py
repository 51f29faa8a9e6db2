"""LR range test and the dynamic schedule."""

from __future__ import annotations

import itertools

import pytest
import torch

from d2mtl.config.train import LRConfig
from d2mtl.lr import DynamicLR, range_test


def test_range_test_finds_a_sane_rate_on_a_toy_problem():
    """Least squares with plain SGD: gradient descent diverges above 2 / (largest Hessian eigenvalue)."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    hessian_max = (
        torch.linalg.eigvalsh(2 * torch.cat([x, torch.ones(256, 1)], 1).T @ torch.cat([x, torch.ones(256, 1)], 1) / 256)
        .max()
        .item()
    )

    def step(rate: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    result = range_test(step, LRConfig(range_start=1e-5, range_end=10.0, range_steps=80))
    assert not result.fallback
    assert 1e-3 < result.peak < 2 / hessian_max  # fast, yet below the divergence bound
    assert result.peak == pytest.approx(result.best_lr / 10)
    assert len(result.lrs) < 80  # stopped once the loss diverged
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    first = step(result.peak)
    assert [step(result.peak) for _ in range(50)][-1] < 0.05 * first  # and it trains


def test_range_test_falls_back_when_the_loss_never_falls():
    result = range_test(lambda rate: 1.0 + rate, LRConfig(lr=3e-3, range_steps=20))
    assert result.fallback and result.peak == 3e-3


def schedule(cfg: LRConfig, peak=1.0, total=100, per_epoch=10):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return optimizer, DynamicLR(optimizer, cfg, peak, total, per_epoch)


def rates(optimizer, scheduler, steps):
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_one_cycle_rises_to_the_peak_then_falls():
    optimizer, scheduler = schedule(LRConfig(warmup=0.2, start_div=25, final_div=1000))
    seen = rates(optimizer, scheduler, 100)
    assert seen[0] == pytest.approx(1 / 25)
    assert max(seen) == pytest.approx(1.0) and seen.index(max(seen)) == 20
    assert seen[-1] < 2 / 1000 and scheduler.shape(100) == pytest.approx(1 / 1000)
    assert all(a <= b for a, b in itertools.pairwise(seen[:21])) and all(
        a >= b for a, b in itertools.pairwise(seen[20:])
    )


def test_cyclic_cycles_with_halving_amplitude():
    optimizer, scheduler = schedule(LRConfig(schedule="cyclic", cycle_epochs=1.0, start_div=10))
    seen = rates(optimizer, scheduler, 30)
    assert seen[0] == pytest.approx(0.1) and seen[5] == pytest.approx(1.0)
    assert seen[15] == pytest.approx(0.1 + 0.9 / 2) and seen[10] == pytest.approx(0.1)


def test_plateau_rule_lowers_every_later_rate():
    optimizer, scheduler = schedule(LRConfig(plateau_patience=2, plateau_factor=0.5))
    rates(optimizer, scheduler, 30)
    before = scheduler.shape(30)
    assert not scheduler.plateau_step(1.0, 0)
    assert not scheduler.plateau_step(1.0, 1)  # first epoch without improvement
    assert scheduler.plateau_step(1.0, 2)  # second: lowered
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * before)
    assert not scheduler.plateau_step(0.5, 3) and scheduler.lowered_at == [2]
    state = scheduler.state_dict()
    _, restored = schedule(LRConfig(plateau_patience=2, plateau_factor=0.5))
    restored.load_state_dict(state)
    assert restored.scale == 0.5 and restored.get_lr() == scheduler.get_lr()


def test_fixed_schedule_is_constant_and_ignores_plateaus():
    optimizer, scheduler = schedule(LRConfig(schedule="fixed", lr=0.02), peak=5.0)
    assert set(rates(optimizer, scheduler, 20)) == {0.02}
    assert not any(scheduler.plateau_step(1.0, e) for e in range(5))
