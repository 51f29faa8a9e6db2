"""Predict: detection + alignment as ingest, one forward pass for every task, results for every input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import training_record
from PIL import Image

from d2mtl import data, faces, layout, store
from d2mtl.cli import main
from d2mtl.config.ingest import IngestConfig
from d2mtl.config.train import ModelConfig
from d2mtl.errors import UserError
from d2mtl.inference import InferenceModel, output_names
from d2mtl.models import ModelSpec, MultiTaskNet, save_model
from d2mtl.predict import (
    EXIT_BAD_INPUT,
    EXIT_NO_FACE,
    EXIT_NO_FACE_BAD_INPUT,
    Analyzer,
    csv_columns,
    exit_code,
    latest_model,
    list_images,
    write_results,
)
from d2mtl.tasks import AGE_MIN, TASKS

CLASS_TASKS = [t for t in TASKS if TASKS[t].kind == "classification"]


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def noise(seed: int = 0, shape=(120, 160, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def analyzer(model_dir) -> Analyzer:
    return Analyzer(model_dir, device="cpu")


@pytest.fixture(scope="module")
def utk_faces(shared_data) -> list[np.ndarray]:
    paths = sorted((shared_data / "utkface").glob("*.jpg"))[:3]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two face photos pasted on one grey canvas with a margin around and between them."""
    height = max(left.shape[0], right.shape[0]) + 60
    canvas = np.full((height, left.shape[1] + right.shape[1] + 90, 3), 127, np.uint8)
    canvas[30 : 30 + left.shape[0], 30 : 30 + left.shape[1]] = left
    canvas[30 : 30 + right.shape[0], 60 + left.shape[1] : 60 + left.shape[1] + right.shape[1]] = right
    return canvas


# ---- the graph -----------------------------------------------------------------------------------


def test_one_pass_gives_what_net_predict_gives():
    torch.manual_seed(0)
    net = MultiTaskNet(ModelSpec.from_config(ModelConfig(input_size=32), TASKS), weights=None).eval()
    graph = InferenceModel(net).eval()
    x = torch.randn(3, 3, 32, 32)
    outputs = dict(zip(graph.output_names, graph(x), strict=True))
    expected = net.predict(x)
    for task in CLASS_TASKS:
        torch.testing.assert_close(outputs[task], expected[task])
    torch.testing.assert_close(outputs["age"], expected["age"])
    torch.testing.assert_close(outputs["age_std"], expected["age_std"])
    assert (outputs["age_low"] <= outputs["age"]).all() and (outputs["age"] <= outputs["age_high"]).all()


def test_age_interval_is_the_10th_to_90th_percentile_of_the_distribution():
    net = MultiTaskNet(ModelSpec.from_config(ModelConfig(input_size=32), ("age",)), weights=None).eval()
    head = net.heads["age"]
    logits = torch.full((head.out_features,), -1e4)
    logits[20 - AGE_MIN : 25 - AGE_MIN] = 0.0  # uniform over 20..24: CDF 0.2, 0.4, ..., 1.0
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(logits)
    outputs = dict(zip(output_names(net), InferenceModel(net)(torch.randn(2, 3, 32, 32)), strict=True))
    assert outputs["age_low"].tolist() == [20.0, 20.0]
    assert outputs["age_high"].tolist() == [24.0, 24.0]
    torch.testing.assert_close(outputs["age"], torch.full((2,), 22.0))
    wide = dict(zip(output_names(net), InferenceModel(net, age_interval=0.5)(torch.randn(1, 3, 32, 32)), strict=True))
    assert (wide["age_low"].item(), wide["age_high"].item()) == (21.0, 23.0)  # 25th-75th percentile


def test_l1_age_head_interval_is_the_point_estimate():
    net = MultiTaskNet(
        ModelSpec.from_config(ModelConfig(age_head="l1", input_size=32), ("age", "gender")), weights=None
    ).eval()
    outputs = dict(zip(output_names(net), InferenceModel(net)(torch.randn(2, 3, 32, 32)), strict=True))
    assert torch.equal(outputs["age_low"], outputs["age"]) and torch.equal(outputs["age_high"], outputs["age"])
    assert torch.equal(outputs["age_std"], torch.zeros(2))


def test_bad_age_interval_and_batch_size_are_user_errors(model_dir):
    with pytest.raises(UserError, match="age interval"):
        Analyzer(model_dir, device="cpu", age_interval=1.0)
    with pytest.raises(UserError, match="batch size"):
        Analyzer(model_dir, device="cpu", batch_size=0)


# ---- inputs without faces ------------------------------------------------------------------------


def test_faces_are_aligned_at_the_size_the_model_trained_on(analyzer, tmp_path, caplog):
    out = str(tmp_path / "model")
    save_model(
        MultiTaskNet(ModelSpec.from_config(ModelConfig(input_size=32), TASKS), weights=None),
        out,
        training=training_record(faces={"image_size": "96"}),
    )
    assert Analyzer(out).face_size == 96
    assert Analyzer(out, ingest=IngestConfig(image_size=112)).face_size == 96
    assert "trained on 96 px faces" in caplog.text
    assert analyzer.face_size == IngestConfig().image_size  # a card without face settings: ingest's default


def test_generated_images_have_no_face(analyzer):
    flat = np.full((200, 200, 3), 90, np.uint8)
    results = analyzer.analyze([png(noise()), flat, noise(1, (64, 64))])
    assert [r.status for r in results] == ["no_face"] * 3
    assert all(r.faces == [] and "score" in r.reason for r in results)
    assert (results[0].width, results[0].height) == (160, 120)
    assert [r.source for r in results] == ["<bytes 0>", "<array 1>", "<array 2>"]


def test_corrupt_empty_missing_files_are_results_not_errors(analyzer, tmp_path):
    good = png(noise())
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 3])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "fine.png").write_bytes(good)
    paths = [
        tmp_path / "truncated.png",
        tmp_path / "empty.jpg",
        tmp_path / "missing.jpg",
        tmp_path / "text.jpg",
        tmp_path / "fine.png",
    ]
    results = analyzer.analyze([str(p) for p in paths] + [np.zeros((4, 4, 4), np.uint8)])
    assert [r.status for r in results] == [
        "unreadable",
        "unreadable",
        "not_found",
        "unreadable",
        "no_face",
        "unreadable",
    ]
    assert [r.source for r in results[:5]] == [str(p) for p in paths]
    assert results[1].reason == "empty file" and "array" in results[5].reason


def test_list_images_expands_folders_and_keeps_missing_paths(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.JPG", "a/b/2.png", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    found = list_images([str(tmp_path / "a"), str(tmp_path / "missing.jpg")])
    assert found == [str(tmp_path / "a/1.JPG"), str(tmp_path / "a/b/2.png"), str(tmp_path / "missing.jpg")]
    with pytest.raises(UserError, match="no images"):
        list_images([str(tmp_path / "empty")])


def test_images_from_an_s3_prefix(analyzer, s3_env):
    store.write_bytes("s3://bucket/photos/noise.png", png(noise()))
    store.write_bytes("s3://bucket/photos/sub/broken.jpg", b"\xff\xd8\xff garbage")
    store.write_bytes("s3://bucket/photos/readme.txt", b"skip me")
    uris = list_images(["s3://bucket/photos", "s3://bucket/nothing-here.jpg"])
    assert uris == ["s3://bucket/photos/noise.png", "s3://bucket/photos/sub/broken.jpg", "s3://bucket/nothing-here.jpg"]
    assert [r.status for r in analyzer.analyze(uris)] == ["no_face", "unreadable", "not_found"]


# ---- real faces ----------------------------------------------------------------------------------


@pytest.mark.realdata
def test_a_real_face_gets_every_attribute(analyzer, utk_faces):
    [result] = analyzer.analyze(utk_faces[0])
    assert result.status == "ok" and result.reason is None and len(result.faces) == 1
    face = result.faces[0]
    x1, y1, x2, y2 = face.box
    assert x1 < x2 and y1 < y2 and 0 < (x1 + x2) / 2 < 200 and 0 < (y1 + y2) / 2 < 200  # may reach past the edge
    assert (x2 - x1) * (y2 - y1) > 0.3 * 200 * 200 and face.detection_score >= 0.9  # UTKFace: the face fills the crop
    assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face.landmarks) and len(face.landmarks) == 5
    assert face.age.low <= face.age.years <= face.age.high
    assert set(face.classes) == set(CLASS_TASKS)
    for task, estimate in face.classes.items():
        assert list(estimate.probabilities) == list(TASKS[task].classes)
        assert sum(estimate.probabilities.values()) == pytest.approx(1, abs=1e-4)
        assert estimate.probability == max(estimate.probabilities.values())
        assert estimate.label == max(estimate.probabilities, key=estimate.probabilities.get)


@pytest.mark.realdata
def test_the_face_is_aligned_as_ingest_aligns_it(analyzer, utk_faces):
    """The network gets the ingest face (same detector, template, size, JPEG) through the card's eval transform."""
    located = analyzer.locate(utk_faces[0])
    detection = analyzer.detector.main_face(utk_faces[0])
    ingest_jpeg = faces.encode_jpeg(faces.align(utk_faces[0], detection.landmarks, 112), 95)
    assert located.jpegs == [ingest_jpeg]
    expected = analyzer.net.predict(
        data.preprocess([ingest_jpeg], analyzer.card.input_size, analyzer.card.mean, analyzer.card.std)
    )
    face = analyzer.analyze(utk_faces[0])[0].faces[0]
    for task in CLASS_TASKS:
        assert list(face.classes[task].probabilities.values()) == pytest.approx(expected[task][0].tolist(), abs=1e-5)
    assert face.age.years == pytest.approx(expected["age"].item(), abs=0.01)


@pytest.mark.realdata
def test_two_pasted_faces_give_two_face_results(analyzer, utk_faces):
    canvas = side_by_side(utk_faces[0], utk_faces[1])
    [result] = analyzer.analyze(canvas)
    assert result.status == "ok" and len(result.faces) == 2
    centres = sorted((f.box[0] + f.box[2]) / 2 for f in result.faces)
    middle = canvas.shape[1] / 2
    assert centres[0] < middle < centres[1]
    assert [f.detection_score for f in result.faces] == sorted((f.detection_score for f in result.faces), reverse=True)


@pytest.mark.realdata
def test_faces_of_many_images_share_forward_passes(model_dir, utk_faces):
    inputs = [side_by_side(utk_faces[0], utk_faces[1]), png(noise()), utk_faces[2], b"broken", utk_faces[0]]
    batches: dict[int, list[int]] = {}
    results = {}
    for batch_size in (64, 2):
        analyzer = Analyzer(model_dir, device="cpu", batch_size=batch_size)
        batches[batch_size] = []
        analyzer.graph.register_forward_hook(
            lambda module, args, out, sizes=batches[batch_size]: sizes.append(args[0].shape[0])
        )
        results[batch_size] = analyzer.analyze(inputs)
    assert batches[64] == [4]  # every face of every image in one pass
    assert batches[2] == [2, 2]  # two faces waiting -> a pass; then the last two images' faces
    assert [len(r.faces) for r in results[64]] == [2, 0, 1, 0, 1]
    assert [r.status for r in results[2]] == ["ok", "no_face", "ok", "unreadable", "ok"]
    for small, large in zip(results[2], results[64], strict=True):
        for a, b in zip(small.faces, large.faces, strict=True):
            assert a.age.years == pytest.approx(b.age.years, abs=0.01)
            assert a.classes["race"].probability == pytest.approx(b.classes["race"].probability, abs=1e-5)


# ---- CLI output ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("photos")
    files = sorted((shared_data / "utkface").glob("*.jpg"))[:2]
    pair = side_by_side(*(np.asarray(Image.open(p).convert("RGB")) for p in files))
    Image.fromarray(pair).save(root / "pair.jpg")
    (root / "noise.png").write_bytes(png(noise()))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.realdata
def test_cli_json_is_one_object_per_image(capsys, model_dir, photo_dir):
    code, out, err = run_cli(capsys, str(photo_dir), "--model", model_dir, "--format", "json")
    assert code == EXIT_BAD_INPUT  # faces found, but broken.jpg is unreadable
    records = {Path(r["source"]).name: r for r in map(json.loads, out.splitlines())}
    assert set(records) == {"pair.jpg", "noise.png", "broken.jpg"}
    assert {k: records[k]["status"] for k in records} == {
        "pair.jpg": "ok",
        "noise.png": "no_face",
        "broken.jpg": "unreadable",
    }
    face = records["pair.jpg"]["faces"][0]
    assert set(face) == {"box", "landmarks", "detection_score", "age", "classes"}
    assert set(face["age"]) == {"years", "low", "high", "std"} and set(face["classes"]) == set(CLASS_TASKS)
    assert set(face["classes"]["gender"]) == {"label", "probability", "probabilities"}
    assert "3 image(s), 2 face(s); 1 no face, 1 unreadable" in err


@pytest.mark.realdata
def test_cli_csv_is_one_row_per_face_or_faceless_image(capsys, model_dir, photo_dir):
    code, out, _ = run_cli(
        capsys,
        str(photo_dir / "pair.jpg"),
        str(photo_dir / "noise.png"),
        "--model",
        model_dir,
        "--format",
        "csv",
        "--batch-size",
        "1",
    )
    assert code == 0
    reader = csv.DictReader(io.StringIO(out))
    assert reader.fieldnames == csv_columns(list(TASKS))
    rows = list(reader)
    assert [(r["status"], r["face"]) for r in rows] == [("ok", "0"), ("ok", "1"), ("no_face", "")]
    for row in rows[:2]:
        assert float(row["age_low"]) <= float(row["age"]) <= float(row["age_high"])
        assert row["expression"] in TASKS["expression"].classes
        assert sum(float(row[f"race_{name}"]) for name in TASKS["race"].classes) == pytest.approx(1, abs=1e-4)
        assert float(row["left_eye_x"]) < float(row["right_eye_x"])
    assert rows[2]["age"] == "" and rows[2]["reason"]


@pytest.mark.parametrize(
    "counts, code",
    [
        ({"images": 2, "faces": 1, "ok": 1, "no_face": 1}, 0),
        ({"images": 1, "faces": 0, "no_face": 1}, 3),
        ({"images": 2, "faces": 3, "ok": 1, "not_found": 1}, 4),
        ({"images": 2, "faces": 0, "no_face": 1, "not_found": 1}, 5),
        ({"images": 1, "faces": 0, "unreadable": 1}, 5),
    ],
)
def test_exit_codes_tell_nothing_predicted_from_bad_input(counts, code):
    assert exit_code(counts) == code


def test_csv_columns_follow_the_model_tasks():
    columns = csv_columns(["gender"])
    assert columns[-4:] == ["gender", "gender_probability", "gender_male", "gender_female"]
    assert "age" not in columns and "expression" not in columns


def test_cli_table_and_faceless_csv_need_no_faces(capsys, model_dir, tmp_path):
    (tmp_path / "noise.png").write_bytes(png(noise()))
    code, out, _ = run_cli(capsys, str(tmp_path), str(tmp_path / "gone.jpg"), "--model", model_dir)
    assert code == EXIT_NO_FACE_BAD_INPUT  # nothing predicted, and an input was missing
    assert out.splitlines() == [
        f"{tmp_path / 'noise.png'}  no_face: no face with detection score >= 0.9",
        f"{tmp_path / 'gone.jpg'}  not_found: no such file",
    ]
    buffer = io.StringIO()
    analyzer = Analyzer(model_dir, device="cpu")
    counts = write_results(analyzer.analyze_iter([str(tmp_path / "noise.png")]), "csv", buffer, analyzer.tasks)
    assert counts == {"images": 1, "faces": 0, "no_face": 1}
    assert len(buffer.getvalue().splitlines()) == 2


def test_cli_default_model_is_the_latest_run(capsys, model_dir, tmp_path):
    (tmp_path / "noise.png").write_bytes(png(noise()))
    run_root = tmp_path / "runs"
    code, _, err = run_cli(capsys, str(tmp_path / "noise.png"), "--set", f"pipeline.run_root={run_root}")
    assert code == 2 and "--model" in err and len(err.strip().splitlines()) == 1
    run_root.mkdir()
    (run_root / layout.LATEST_RUN).write_text(json.dumps({"run_id": "r1", "model": model_dir}))
    assert latest_model(str(run_root)) == model_dir
    code, out, _ = run_cli(
        capsys, str(tmp_path / "noise.png"), "--set", f"pipeline.run_root={run_root}", "--format", "json"
    )
    assert code == EXIT_NO_FACE and json.loads(out)["status"] == "no_face"


def test_cli_errors_are_one_line(capsys, model_dir, tmp_path):
    code, _, err = run_cli(capsys, str(tmp_path), "--model", model_dir)
    assert code == 2 and "no images" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, str(tmp_path / "x.png"), "--model", str(tmp_path / "nope"))
    assert code == 2 and "not a model folder" in err
