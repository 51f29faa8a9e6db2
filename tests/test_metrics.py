import numpy as np
import pytest

from d2mtl import metrics
from d2mtl.tasks import TASKS

NAN = np.nan


def test_age_scores_exact():
    scores = metrics.age_scores(np.array([20, 30, 40, 50.0]), np.array([22, 36, 40, 45.0]))
    assert scores["mae"] == pytest.approx(13 / 4)
    assert scores["cs5"] == pytest.approx(3 / 4)  # an error of exactly 5 years counts


def test_interval_accuracy_is_inclusive():
    pred = np.array([27.0, 35.0, 2.0, 24.9])
    assert metrics.interval_accuracy(pred, np.array([25, 25, 0, 25.0]), np.array([32, 32, 2, 32.0])) == 0.5


def test_class_scores_exact():
    scores = metrics.class_scores(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1]))
    assert scores["accuracy"] == 0.5
    assert scores["macro_f1"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)


def test_confusion_shape_and_registry_order():
    race = TASKS["race"]
    result = metrics.confusion(race, np.array([0, 0, 3, 4]), np.array([0, 3, 3, 1]))
    assert result["categories"] == ["white", "black", "asian", "indian", "others"]
    matrix = np.array(result["matrix"])
    assert matrix.shape == (5, 5) and matrix.sum() == 4
    assert matrix[0, 0] == 1 and matrix[0, 3] == 1 and matrix[3, 3] == 1 and matrix[4, 1] == 1  # rows = truth


def _truth():
    """Two datasets: 'utk' labels age/gender/race, 'fer' expression, 'adience' only age groups."""
    return {
        "dataset": np.array(["utk"] * 4 + ["fer"] * 3 + ["adience"] * 2),
        "split": np.array(["test"] * 9),
        "age": np.array([20, 30, 40, 50, NAN, NAN, NAN, NAN, NAN]),
        "age_low": np.array([NAN] * 7 + [25, 38.0]),
        "age_high": np.array([NAN] * 7 + [32, 43.0]),
        "gender": np.array([0, 0, 1, 1, NAN, NAN, NAN, NAN, NAN]),
        "race": np.array([0, 1, 0, NAN, NAN, NAN, NAN, NAN, NAN]),
        "expression": np.array([NAN] * 4 + [3, 3, 6, NAN, NAN]),
    }


def test_score_rows_per_dataset_and_missing_task():
    predictions = {
        "age": np.array([22, 36, 40, 45, 30, 30, 30, 30, 50.0]),
        "gender": np.array([0, 1, 1, 1, 0, 0, 0, 0, 0]),
    }  # no expression head
    rows, confusions = metrics.score(_truth(), predictions)
    overall = {(r["task"], r["dataset"], r["metric"]): (r["value"], r["n"]) for r in rows if r["group_by"] is None}
    assert overall[("age", "utk", "mae")] == (pytest.approx(3.25), 4)
    assert overall[("age", "adience", "group_accuracy")] == (0.5, 2)
    assert overall[("gender", "utk", "accuracy")] == (0.75, 4)
    assert not any(task == "expression" for task, _, _ in overall)  # the model lacks the task: no rows
    assert not any(dataset == "fer" for _, dataset, _ in overall)  # fer labels no task this model has
    assert [(c["task"], c["dataset"]) for c in confusions] == [("gender", "utk")]
    assert confusions[0]["matrix"] == [[1, 1], [0, 2]]


def test_fairness_grouping_by_gender_and_race():
    predictions = {"age": np.array([22, 36, 40, 45, 0, 0, 0, 0, 0.0])}
    rows, _ = metrics.score(_truth(), predictions)
    grouped = {(r["group_by"], r["group"], r["metric"]): (r["value"], r["n"]) for r in rows if r["group_by"]}
    assert grouped[("gender", "male", "mae")] == (pytest.approx(4.0), 2)  # errors 2, 6
    assert grouped[("gender", "female", "mae")] == (pytest.approx(2.5), 2)  # errors 0, 5
    assert grouped[("race", "white", "mae")] == (pytest.approx(1.0), 2)  # errors 2, 0 (the 4th face has no race)
    assert grouped[("race", "black", "mae")] == (pytest.approx(6.0), 1)
    assert all(r["dataset"] == "utk" for r in rows if r["group_by"])  # only utk has gender / race labels


def test_fairness_gaps_follow_metric_direction_and_min_group():
    predictions = {"age": np.array([22, 36, 40, 45, 0, 0, 0, 0, 0.0])}
    rows, _ = metrics.score(_truth(), predictions)
    gaps = {(g["group_by"], g["metric"]): g for g in metrics.fairness_gaps(rows)}
    mae_gender = gaps[("gender", "mae")]
    assert mae_gender["gap"] == pytest.approx(1.5)
    assert (mae_gender["best_group"], mae_gender["worst_group"]) == ("female", "male")  # lower MAE is better
    assert gaps[("race", "mae")]["gap"] == pytest.approx(5.0)
    strict = {(g["group_by"], g["metric"]) for g in metrics.fairness_gaps(rows, min_group_size=2)}
    assert ("race", "mae") not in strict and ("gender", "mae") in strict  # 'black' has one face only


def test_error_of_and_primary_metric():
    assert metrics.error_of("mae", 4.0) == 4.0
    assert metrics.error_of("accuracy", 0.75) == pytest.approx(0.25)
    assert metrics.primary_metric(TASKS["age"], {"cs5", "group_accuracy"}) == "group_accuracy"
    assert metrics.primary_metric(TASKS["race"], {"macro_f1", "accuracy"}) == "accuracy"
