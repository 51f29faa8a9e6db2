"""Masked per-task losses and task weighting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from d2mtl.config.train import ModelConfig, TrainConfig
from d2mtl.data import empty_targets
from d2mtl.losses import (
    MaskedTaskLoss,
    TaskWeighting,
    age_target_distribution,
    dataset_share_weights,
    interval_distance,
)
from d2mtl.models import build_model
from d2mtl.tasks import AGE_MIN, TASKS

TASK_NAMES = tuple(TASKS)


def make_targets(n: int, **labels) -> dict[str, torch.Tensor]:
    """Targets for n rows; labels: task -> list with None for missing (age: exact years)."""
    targets = empty_targets(n, TASK_NAMES)
    for task, values in labels.items():
        for i, value in enumerate(values):
            if value is None:
                continue
            if task == "age":
                targets["age_low"][i] = targets["age_high"][i] = value
            else:
                targets[task][i] = value
            targets[f"{task}_weight"][i] = 1.0
    return {k: torch.from_numpy(v) for k, v in targets.items()}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model(TrainConfig(model=ModelConfig(weights="none", input_size=32, dropout=0.0))).train()


def backward(net, targets, weighting=None):
    net.zero_grad(set_to_none=True)
    losses = MaskedTaskLoss(TASK_NAMES)(net(torch.randn(4, 3, 32, 32)), targets)
    total = (weighting or TaskWeighting(TASK_NAMES))(losses)
    total.backward()
    return losses, total


def test_missing_labels_give_zero_gradient_to_their_head(net):
    targets = make_targets(4, age=[30, None, 50, None], gender=[0, 1, None, None], race=[None, 2, None, 4])
    losses, total = backward(net, targets)
    assert set(losses) == {"age", "gender", "race"} and torch.isfinite(total)
    assert net.heads["expression"].weight.grad is None  # no term at all: not even a zero gradient
    for task in ("age", "gender", "race"):
        assert net.heads[task].weight.grad.abs().sum() > 0


def test_a_batch_with_one_task_only_works(net):
    losses, total = backward(net, make_targets(4, expression=[0, 3, 6, 2]))
    assert list(losses) == ["expression"] and torch.isfinite(total)
    assert all(net.heads[t].weight.grad is None for t in ("age", "gender", "race"))


def test_rows_without_the_label_do_not_change_its_loss():
    outputs = {"gender": torch.tensor([[2.0, -1.0], [0.5, 0.5], [9.0, -9.0]])}
    loss = MaskedTaskLoss(("gender",))
    targets = {k: torch.from_numpy(v) for k, v in empty_targets(3, ("gender",)).items()}
    targets["gender"][:2], targets["gender_weight"][:2] = torch.tensor([0, 1]), 1.0
    expected = torch.nn.functional.cross_entropy(outputs["gender"][:2], torch.tensor([0, 1]))
    assert loss(outputs, targets)["gender"].item() == pytest.approx(expected.item(), rel=1e-6)
    targets["gender_weight"][:] = 0.0
    assert loss(outputs, targets) == {}


def test_soft_targets_are_kl_to_the_given_probabilities():
    probs = torch.tensor([[0.2, 0.8]])
    targets = {k: torch.from_numpy(v) for k, v in empty_targets(1, ("gender",)).items()}
    targets["gender_probs"][:], targets["gender_soft"][:], targets["gender_weight"][:] = probs, True, 0.5
    loss = MaskedTaskLoss(("gender",))
    assert loss({"gender": probs.log()}, targets)["gender"].item() == pytest.approx(0.0, abs=1e-6)
    kl = (probs * (probs.log() - torch.tensor([[0.5, 0.5]]).log())).sum()
    assert loss({"gender": torch.zeros(1, 2)}, targets)["gender"].item() == pytest.approx(0.5 * kl.item(), rel=1e-5)


def test_age_intervals_train_through_the_interval():
    distribution = age_target_distribution(torch.tensor([20.0, 33.0]), torch.tensor([29.0, 33.0]), sigma=0.01)
    ages = np.arange(AGE_MIN, AGE_MIN + distribution.shape[1])
    group = distribution[0].numpy()
    assert group[(ages >= 20) & (ages <= 29)].sum() == pytest.approx(1.0, abs=1e-4)
    assert group[25] == pytest.approx(0.1, abs=1e-3)  # uniform over the ten years
    assert distribution[1, 33].item() == pytest.approx(1.0, abs=1e-4)
    assert interval_distance(
        torch.tensor([25.0, 18.0, 31.0]), torch.tensor([20.0] * 3), torch.tensor([29.0] * 3)
    ).tolist() == [0.0, 2.0, 2.0]
    l1 = MaskedTaskLoss(("age",), age_head="l1")
    targets = {k: torch.from_numpy(v) for k, v in empty_targets(2, ("age",)).items()}
    targets["age_low"][:] = torch.tensor([20.0, 40.0])
    targets["age_high"][:] = torch.tensor([29.0, 40.0])
    targets["age_weight"][:] = 1.0
    assert l1({"age": torch.tensor([25.0, 43.0])}, targets)["age"].item() == pytest.approx(1.5)


def test_uncertainty_weighting_skips_absent_tasks(net):
    weighting = TaskWeighting(TASK_NAMES, "uncertainty")
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    losses, total = backward(net, make_targets(4, gender=[0, 1, 0, 1], expression=[1, None, 3, None]), weighting)
    expected = sum(math.exp(-s) * losses[t].item() + s / 2 for t, s in (("gender", 0.2), ("expression", 0.4)))
    assert total.item() == pytest.approx(float(expected), rel=1e-5)
    grad = weighting.log_vars.grad
    assert grad[0] == 0 and grad[2] == 0 and grad[1] != 0 and grad[3] != 0


def test_fixed_and_dwa_weighting():
    losses = {"age": torch.tensor(2.0), "gender": torch.tensor(1.0)}
    fixed = TaskWeighting(("age", "gender", "race"), "fixed", {"age": 0.5})
    assert fixed(losses).item() == pytest.approx(0.5 * 2 + 1)
    dwa = TaskWeighting(("age", "gender"), "dwa", temperature=2.0)
    assert dwa(losses).item() == pytest.approx(3.0)  # weights 1 until two epochs are seen
    dwa.end_epoch({"age": 4.0, "gender": 1.0})
    dwa.end_epoch({"age": 2.0, "gender": 1.0})  # age fell to 0.5x, gender stayed: gender gets more weight
    ratios = torch.tensor([0.5, 1.0])
    expected = 2 * torch.softmax(ratios / 2.0, 0)
    assert dwa.weights() == pytest.approx({"age": expected[0].item(), "gender": expected[1].item()})
    assert dwa(losses).item() == pytest.approx(float(expected[0] * 2 + expected[1] * 1))
    with pytest.raises(ValueError, match="no task has a label"):
        dwa({})


def test_dataset_share_weights_give_each_dataset_an_equal_share():
    tasks = ("age", "gender", "race", "expression")
    two = {
        "utk": {"rows": 9, "age": 9, "gender": 9, "race": 8, "expression": 0},
        "fer": {"rows": 20, "age": 0, "gender": 0, "race": 0, "expression": 20},
    }
    weights = dataset_share_weights(two, tasks)
    assert weights == pytest.approx({"age": 2 / 3, "gender": 2 / 3, "race": 2 / 3, "expression": 2.0})
    five = {
        **two,
        "raf": {"rows": 5, "expression": 5},
        "aaf": {"rows": 5, "age": 5, "gender": 5},
        "appa": {"rows": 5, "age": 5},
        "unused": {"rows": 3},
    }
    weights = dataset_share_weights(five, tasks)
    assert sum(weights.values()) == pytest.approx(4.0)
    assert weights["expression"] == pytest.approx(4 * (1 / 5 + 1 / 5))
    assert weights["race"] == pytest.approx(4 / 15)
    assert dataset_share_weights({"utk": two["utk"]}, ("age", "expression")) == {"age": 2.0, "expression": 0.0}


def test_dataset_share_weighting_trains_with_those_fixed_weights(tiny_tables):
    from d2mtl.data import FaceIndex
    from d2mtl.engine import task_weighting

    index = FaceIndex.load(tiny_tables["faces"], tiny_tables["labels"], tuple(TASKS))
    cfg = TrainConfig(weighting="dataset_share", task_weights={"race": 0.5})
    mode, fixed = task_weighting(cfg, index.summary(index.rows("train")), tuple(TASKS))
    assert mode == "fixed"
    assert fixed == pytest.approx({"age": 2 / 3, "gender": 2 / 3, "race": 1 / 3, "expression": 2.0})
