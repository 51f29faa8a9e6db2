"""The data distillation maths on hand-made predictions."""

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from d2mtl import contracts, distill
from d2mtl.config.pseudolabel import PseudoLabelConfig, parse_transform


def test_classification_mean_over_members():
    probs = np.array(
        [
            [[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]],  # member 1 (e.g. identity)
            [[0.7, 0.3], [0.2, 0.8], [0.3, 0.7]],
        ]
    )  # member 2 (e.g. hflip)
    pred = distill.aggregate_classification(probs)
    np.testing.assert_allclose(pred.probs, [[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], rtol=1e-6)
    assert pred.value.tolist() == [0, 1, 1]
    np.testing.assert_allclose(pred.score, [0.8, 0.7, 0.6], rtol=1e-6)


def test_regression_mean_and_spread():
    ages = np.array([[20.0, 40.0], [22.0, 40.0], [24.0, 40.0]])  # 3 members, 2 faces
    pred = distill.aggregate_regression(ages)
    np.testing.assert_allclose(pred.value, [22.0, 40.0])
    np.testing.assert_allclose(pred.score, [np.sqrt(8 / 3), 0.0], rtol=1e-6)


def test_aggregation_refuses_wrong_shapes():
    with pytest.raises(ValueError, match="members, rows, classes"):
        distill.aggregate_classification(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="members, rows"):
        distill.aggregate_regression(np.zeros((0, 3)))


def _pred(values, scores, classes=3):
    values = np.asarray(values)
    probs = np.eye(classes, dtype=np.float32)[values]
    return distill.TaskPrediction(value=values, score=np.asarray(scores, dtype=np.float32), probs=probs)


def test_fixed_threshold_keeps_only_confident_candidates():
    pred = _pred([0, 1, 2, 0], [0.95, 0.89, 0.9, 0.99])
    candidate = np.array([True, True, True, False])  # the last row has ground truth
    selection = distill.select_fixed(pred, candidate, 0.9)
    assert selection.kept.tolist() == [True, False, True, False]
    assert selection.thresholds == {"threshold": 0.9}


def test_spread_bound():
    pred = distill.TaskPrediction(value=np.array([30.0, 50.0, 70.0]), score=np.array([1.0, 3.0, 3.5]))
    kept = distill.select_spread(pred, np.array([True, True, True]), 3.0).kept
    assert kept.tolist() == [True, True, False]


def test_class_quotas_sum_to_total():
    assert distill.class_quotas(10, np.array([0.5, 0.3, 0.2])).tolist() == [5, 3, 2]
    assert distill.class_quotas(7, np.array([1 / 3, 1 / 3, 1 / 3])).tolist() == [3, 2, 2]
    assert distill.class_quotas(0, np.array([0.5, 0.5])).tolist() == [0, 0]


def test_prior_rule_follows_labelled_prior_at_retention():
    # 10 candidates the teacher calls mostly class 0; the labelled prior is 50/50
    values = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    scores = [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.70, 0.60]
    pred = _pred(values, scores, classes=2)
    candidate = np.ones(10, dtype=bool)
    selection = distill.select_prior(pred, candidate, np.array([0.5, 0.5]), 0.6, ("a", "b"))
    # 6 kept in all would be 3 + 3, but class 1 has only 2 candidates: all of them, class 0 its 3 best
    assert selection.kept.tolist() == [True, True, True, False, False, False, False, False, True, True]
    assert selection.thresholds["quota"] == {"a": 3, "b": 3}
    assert selection.thresholds["per_class"] == {"a": pytest.approx(0.97), "b": pytest.approx(0.60)}


def test_prior_rule_ignores_labelled_rows_and_breaks_ties_by_row_order():
    pred = _pred([0, 0, 0, 1], [0.9, 0.9, 0.9, 0.9], classes=2)
    candidate = np.array([False, True, True, True])
    selection = distill.select_prior(pred, candidate, np.array([0.5, 0.5]), 2 / 3, ("a", "b"))
    assert selection.kept.tolist() == [False, True, False, True]


def test_select_dispatches_and_prior_needs_known_labels():
    pred = _pred([0, 1], [0.8, 0.95], classes=2)
    candidate = np.array([True, True])
    kept = distill.select("gender", "fixed", 0.9, pred, candidate).kept
    assert kept.tolist() == [False, True]
    kept = distill.select("gender", "prior", 1.0, pred, candidate, known=np.array([0, 1, 1, 0])).kept
    assert kept.tolist() == [True, True]
    with pytest.raises(ValueError, match="needs known gender labels"):
        distill.select("gender", "prior", 0.5, pred, candidate, known=np.array([]))


def _labels(n=200):
    rows = []
    for i in range(n):
        row = {"sample_id": f"s{i:04d}"}
        if i % 2:
            row.update(age=float(20 + i % 50), gender=i % 2, race=i % 5)
        else:
            row.update(expression=i % 7)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=contracts.LABEL_SCHEMA)


def test_hide_labels_hides_the_fraction_and_returns_the_truth():
    labels = _labels()
    train, truth = distill.hide_labels(labels, 0.2, ["age", "expression"], seed=3)
    assert train.schema == labels.schema and truth.schema == labels.schema
    assert train.column("age").null_count == labels.column("age").null_count + 20
    assert train.column("expression").null_count == labels.column("expression").null_count + 20
    assert train.column("gender").to_pylist() == labels.column("gender").to_pylist()  # not a holdout task
    assert truth.num_rows == 40 and truth.column("gender").null_count == 40
    original = dict(zip(labels.column("sample_id").to_pylist(), labels.column("age").to_pylist(), strict=True))
    for sample_id, age in zip(truth.column("sample_id").to_pylist(), truth.column("age").to_pylist(), strict=True):
        if age is not None:
            assert original[sample_id] == age


def test_hide_labels_is_order_independent_and_nested():
    labels = _labels()
    _, truth = distill.hide_labels(labels, 0.1, ["age"], seed=0)
    _, shuffled = distill.hide_labels(
        labels.take(np.random.default_rng(1).permutation(labels.num_rows)), 0.1, ["age"], seed=0
    )
    _, larger = distill.hide_labels(labels, 0.3, ["age"], seed=0)
    hidden = set(truth.column("sample_id").to_pylist())
    assert hidden == set(shuffled.column("sample_id").to_pylist())
    assert hidden < set(larger.column("sample_id").to_pylist())
    _, other_seed = distill.hide_labels(labels, 0.1, ["age"], seed=1)
    assert hidden != set(other_seed.column("sample_id").to_pylist())


def test_holdout_curve_on_hidden_rows_only():
    pred = _pred([0, 1, 1, 0], [0.95, 0.9, 0.6, 0.99], classes=2)
    candidate = np.ones(4, dtype=bool)
    truth = np.array([0.0, 0.0, 1.0, np.nan])  # the last row was never hidden
    curve = distill.holdout_curve("gender", "fixed", pred, candidate, None, truth, [0.0, 0.7, 0.92])
    assert [p["kept"] for p in curve] == [3, 2, 1]
    assert [p["accuracy"] for p in curve] == [pytest.approx(2 / 3), 0.5, 1.0]
    assert curve[1] == {"threshold": 0.7, "hidden": 3, "kept": 2, "retention": pytest.approx(2 / 3), "accuracy": 0.5}
    ages = distill.TaskPrediction(value=np.array([30.0, 40.0]), score=np.array([1.0, 5.0]))
    curve = distill.holdout_curve("age", "spread", ages, np.ones(2, bool), None, np.array([32.0, 50.0]), [2.0, 6.0])
    assert [p["mae"] for p in curve] == [2.0, 6.0]


def test_config_validates_transforms_and_rules():
    assert parse_transform("hflip+crop:0.9") == [("hflip", 1.0), ("crop", 0.9)]
    with pytest.raises(ValueError, match="unknown op 'rotate'"):
        parse_transform("rotate:10")
    with pytest.raises(ValueError, match="needs a factor"):
        parse_transform("scale")
    with pytest.raises(ValidationError, match="listed twice"):
        PseudoLabelConfig(transforms=["identity", "identity"])
    with pytest.raises(ValidationError, match="does not fit a regression task"):
        PseudoLabelConfig(rules={"age": {"rule": "fixed"}})
    with pytest.raises(ValidationError, match="unknown task"):
        PseudoLabelConfig(tasks=["height"])
    cfg = PseudoLabelConfig(tasks=["expression", "age"], rules={"expression": {"rule": "prior", "retention": 0.4}})
    assert cfg.task_names == ("age", "expression")
    assert cfg.rule_for("age").rule == "spread" and cfg.rule_for("expression").retention == 0.4
    assert cfg.rule_for("age").parameter == 3.0 and cfg.rule_for("expression").parameter == 0.4
