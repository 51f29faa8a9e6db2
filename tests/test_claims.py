import pytest

from d2mtl import claims, roles
from d2mtl.claims import HELD, NOT_HELD, NOT_MEASURABLE
from d2mtl.errors import UserError
from d2mtl.roles import Role

COVERAGE = {"age": {"utk"}, "gender": {"utk"}, "expression": {"fer"}}  # utk~gray is a cross-domain view


def _row(model, task, dataset, metric, value, split="test"):
    return {
        "model": model,
        "task": task,
        "dataset": dataset,
        "split": split,
        "metric": metric,
        "value": value,
        "n": 100,
        "group_by": None,
        "group": None,
    }


def _rows(model, age_mae, gender_acc, expression_acc, gray_age_mae=None, gray_gender_acc=None):
    rows = [
        _row(model, "age", "utk", "mae", age_mae),
        _row(model, "age", "utk", "cs5", 0.5),
        _row(model, "gender", "utk", "accuracy", gender_acc),
        _row(model, "expression", "fer", "accuracy", expression_acc),
    ]
    if gray_age_mae is not None:
        rows += [
            _row(model, "age", "utk~gray", "mae", gray_age_mae),
            _row(model, "gender", "utk~gray", "accuracy", gray_gender_acc),
        ]
    return rows


def _baselines(age_mae=7.0, gender_acc=0.85, expression_acc=0.55):
    return (
        _single("baseline", "age", "mae", age_mae)
        + _single("baseline", "gender", "accuracy", gender_acc)
        + _single("baseline", "expression", "accuracy", expression_acc, dataset="fer")
    )


def _single(kind, task, metric, value, dataset="utk"):
    return [_row(f"{kind}_{task}", task, dataset, metric, value)]


def _roles(rows):
    return {row["model"]: roles.parse_role(row["model"]) for row in rows}


def _assess(rows):
    return {c["claim"]: c for c in claims.assess(rows, _roles(rows), COVERAGE)}


def test_parse_role_spellings():
    assert roles.parse_role("teacher") == Role("teacher")
    assert roles.parse_role("baseline:age") == Role("baseline", "age")
    assert roles.parse_role("baseline_race") == Role("baseline", "race")
    assert roles.parse_role("baselines/gender") == Role("baseline", "gender")
    assert roles.parse_role("student-single:expression") == Role("student_single", "expression")
    assert str(roles.parse_role("student_single_age")) == "student_single:age"
    assert roles.parse_role("students_single/age") == Role("student_single", "age")
    assert roles.parse_role("my-experiment") is None
    with pytest.raises(UserError, match="unknown task 'height'"):
        roles.parse_role("baseline:height")


def test_two_models_in_one_role_refused():
    with pytest.raises(UserError, match="both have role teacher"):
        roles.index_roles({"a": Role("teacher"), "b": Role("teacher")})


def test_claim1_held_when_teacher_wins_every_task():
    rows = _rows("teacher", 6.0, 0.90, 0.60) + _baselines()
    claim = _assess(rows)[1]
    assert claim["status"] == HELD
    assert {(c["task"], c["better"]) for c in claim["comparisons"]} == {
        ("age", True),
        ("gender", True),
        ("expression", True),
    }


def test_claim1_not_held_when_one_baseline_wins():
    rows = _rows("teacher", 6.0, 0.80, 0.60) + _baselines(gender_acc=0.85)
    claim = _assess(rows)[1]
    assert claim["status"] == NOT_HELD
    assert "gender on utk" in claim["reason"]


def test_claim1_tie_is_not_held():
    rows = _rows("teacher", 7.0, 0.90, 0.60) + _baselines(age_mae=7.0)
    assert _assess(rows)[1]["status"] == NOT_HELD


def test_claim1_not_measurable_without_a_baseline():
    rows = _rows("teacher", 6.0, 0.90, 0.60) + _single("baseline", "age", "mae", 7.0)
    claim = _assess(rows)[1]
    assert claim["status"] == NOT_MEASURABLE and claim["missing_tasks"] == ["gender", "expression"]
    assert _assess(_baselines())[1]["status"] == NOT_MEASURABLE  # no teacher at all


def test_claim2_held_when_student_improves_most_cross_domain():
    rows = _rows("teacher", 6.0, 0.90, 0.60, gray_age_mae=10.0, gray_gender_acc=0.70)
    rows += _rows("student", 5.7, 0.905, 0.61, gray_age_mae=8.0, gray_gender_acc=0.80)
    claim = _assess(rows)[2]
    assert claim["status"] == HELD
    assert claim["mean_error_reduction_cross_domain"] > claim["mean_error_reduction_in_domain"] > 0
    assert claim["mean_error_reduction_cross_domain"] == pytest.approx((0.2 + 1 / 3) / 2)


def test_claim2_not_held_when_student_is_worse():
    rows = _rows("teacher", 6.0, 0.90, 0.60, 10.0, 0.70) + _rows("student", 6.5, 0.88, 0.58, 10.5, 0.69)
    assert _assess(rows)[2]["status"] == NOT_HELD


def test_claim2_not_held_when_gain_is_larger_in_domain():
    rows = _rows("teacher", 6.0, 0.90, 0.60, 10.0, 0.70) + _rows("student", 5.0, 0.95, 0.70, 9.9, 0.70)
    claim = _assess(rows)[2]
    assert claim["status"] == NOT_HELD and "not most on other domains" in claim["reason"]


def test_claim2_not_measurable_without_cross_domain_rows():
    rows = _rows("teacher", 6.0, 0.90, 0.60) + _rows("student", 5.0, 0.95, 0.70)
    claim = _assess(rows)[2]
    assert claim["status"] == NOT_MEASURABLE and "cross-domain" in claim["reason"]


def test_claim3_compares_students_on_cross_domain_rows():
    rows = _rows("student", 5.0, 0.95, 0.70, gray_age_mae=8.0, gray_gender_acc=0.80)
    single = [
        _row("student_single_age", "age", "utk~gray", "mae", 9.0),
        _row("student_single_gender", "gender", "utk~gray", "accuracy", 0.75),
    ]
    assert _assess(rows + single)[3]["status"] == HELD
    single[1]["value"] = 0.85
    claim = _assess(rows + single)[3]
    assert claim["status"] == NOT_HELD and "gender on utk~gray" in claim["reason"]
    assert _assess(rows + single[:1])[3]["status"] == NOT_MEASURABLE  # no single-distilled gender student
    assert _assess(rows)[3]["status"] == NOT_MEASURABLE


def test_comparison_table_and_markdown():
    rows = _rows("teacher", 6.0, 0.90, 0.60) + _baselines()
    header, table = claims.comparison_table(rows, ["teacher", "baseline_age"], "test", COVERAGE)
    assert header == ["task", "dataset", "domain", "metric", "teacher", "baseline_age"]
    assert table[0] == ["age", "utk", "in-domain", "mae", 6.0, 7.0]
    assert table[1][4:] == [0.90, None]
    text = claims.claims_markdown(claims.assess(rows, _roles(rows), COVERAGE))
    assert "**held**" in text and "**not measurable**" in text
