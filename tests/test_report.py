import json
from html.parser import HTMLParser

import numpy as np

from d2mtl import claims, layout, metrics, plots, report
from d2mtl.roles import parse_role
from d2mtl.stages import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.sources: list[str] = []
        self.links: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs.get("src", ""))
        if "href" in attrs:
            self.links.append(attrs["href"])
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag):
        self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


def test_confusion_matrix_is_a_png():
    png = plots.confusion_matrix(["male", "female"], [[5, 1], [0, 4]], "gender")
    assert png.startswith(PNG_MAGIC)


def test_the_report_draws_a_model_folders_training_curves_as_training_drew_them(tmp_path):
    doc = {
        "result": {"epochs": 2},
        "lr": {"trace": [0.1, 0.2]},
        "history": [
            {
                "epoch": 1,
                "train": {"age": 2.0},
                "val": {"age_loss": 2.2, "age_mae": 9.0, "age_n": 40, "gender_acc": 0.7},
                "lr": 0.01,
                "plateau": False,
                "task_weights": {"age": 1.0},
            },
            {
                "epoch": 2,
                "train": {"age": 1.5},
                "val": {"age_loss": 1.9, "age_mae": 7.5, "age_n": 40, "gender_acc": 0.8},
                "lr": 0.005,
                "plateau": True,
                "task_weights": {"age": 1.0},
            },
        ],
    }
    (tmp_path / layout.TRAIN_METRICS).write_text(json.dumps(doc))
    model = evaluate.EvalModel("m", str(tmp_path), None, None, {})
    plot = evaluate.training_curves(model)
    assert plot.caption == "m training curves"
    assert plot.png == plots.training_curves(doc["history"], doc["lr"]["trace"])
    assert plot.png.startswith(PNG_MAGIC)
    assert evaluate.training_curves(evaluate.EvalModel("m", str(tmp_path / "none"), None, None, {})) is None


def test_threshold_series_from_holdout_curves():
    doc = {
        "rows": 10,
        "holdout": {
            "fraction": 0.2,
            "curves": {
                "expression": {
                    "parameter": "threshold",
                    "chosen": {"accuracy": 0.8},
                    "curve": [
                        {"threshold": 0.5, "hidden": 10, "kept": 8, "retention": 0.8, "accuracy": 0.6},
                        {"threshold": 0.9, "hidden": 10, "kept": 3, "retention": 0.3, "accuracy": 0.9},
                    ],
                },
                "age": {
                    "parameter": "max_spread",
                    "curve": [
                        {"max_spread": 2.0, "retention": 0.4, "mae": 3.0},
                        {"max_spread": 6.0, "retention": 0.9, "mae": None},
                    ],
                },
            },
        },
    }
    series, xlabels = report.threshold_series(doc)
    assert series["expression: accuracy"] == {"accuracy": ([0.5, 0.9], [0.6, 0.9])}
    assert series["age: mae"] == {"mae": ([2.0], [3.0])}  # a point without a value (nothing kept) is left out
    assert xlabels["age: retention"] == "max_spread" and xlabels["expression: retention"] == "threshold"
    assert plots.line_panels(series, "t", xlabels).startswith(PNG_MAGIC)
    assert report.threshold_series({"holdout": None}) == ({}, {})
    assert plots.line_panels({}, "t", "x") is None


def test_render_is_self_contained_html_with_tables_and_images():
    truth = {
        "dataset": np.array(["utk"] * 4),
        "split": np.array(["test"] * 4),
        "age": np.array([20, 30, 40, 50.0]),
        "gender": np.array([0, 0, 1, 1.0]),
        "race": np.array([0, 1, 0, 1.0]),
    }
    models = {
        "teacher": {"age": truth["age"] + 1, "gender": np.array([0, 0, 1, 1])},
        "baseline_age": {"age": truth["age"] + 3},
        "baseline_gender": {"gender": np.array([0, 1, 1, 1])},
    }
    rows, confusions = [], []
    for model, predictions in models.items():
        model_rows, model_confusions = metrics.score(truth, predictions)
        rows += [{"model": model, **r} for r in model_rows]
        confusions += [{"model": model, **c} for c in model_confusions]
    coverage = {"age": {"utk"}, "gender": {"utk"}}
    roles = {name: parse_role(name) for name in models}
    assessed = claims.assess(rows, roles, coverage)
    figures = [
        report.Plot(f"{c['model']} {c['task']}", plots.confusion_matrix(c["categories"], c["matrix"], "x"))
        for c in confusions
    ]
    html = report.render(
        title="eval <test>",
        models=[{"name": "teacher", "role": "teacher", "uri": "/m/t", "tasks": ["age", "gender"]}],
        claims=assessed,
        comparison=claims.comparison_table(rows, list(roles), "test", coverage),
        rows=rows,
        gaps=metrics.fairness_gaps(rows),
        confusion_plots=figures,
        curve_plots=[],
        threshold_plots=[],
        notes=["a note"],
    )
    parser = _Collector()
    parser.feed(html)
    assert parser.tags["table"] >= 6  # models, claims, claim-1 numbers, comparison, metrics, gaps, groups
    assert len(parser.sources) == 2 and all(s.startswith("data:image/png;base64,") for s in parser.sources)
    assert parser.links == [] and parser.tags.get("script", 0) == 0 and parser.tags.get("link", 0) == 0
    assert "eval <test>" in html.replace("&lt;", "<").replace("&gt;", ">")
    assert "not measurable" in parser.cells  # claims 2 and 3 lack a student
    assert "held" in parser.cells  # claim 1: the teacher beats both baselines (age MAE 1 vs 3, gender 1.0 vs 0.75)


def test_without_a_gap_the_report_says_the_groups_are_too_small():
    rows = [
        {
            "model": "teacher",
            "task": "age",
            "dataset": "utkface",
            "split": "test",
            "metric": "mae",
            "group_by": "gender",
            "group": group,
            "value": value,
            "n": 12,
        }
        for group, value in (("male", 5.0), ("female", 6.0))
    ]
    page = report.render(
        title="t",
        models=[],
        claims=[],
        comparison=(["task"], []),
        rows=rows,
        gaps=metrics.fairness_gaps(rows, 30),
        confusion_plots=[],
        curve_plots=[],
        threshold_plots=[],
        fairness_min_group=30,
    )
    assert "No dataset with gender or race labels" not in page  # the table below lists UTKFace's gender groups
    assert (
        "no attribute has two groups with at least 30 labelled faces (evaluate.fairness_min_group); the largest "
        "group here has 12"
    ) in page
