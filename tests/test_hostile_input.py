"""Bad and hostile input: odd image files, malformed labels, escaping archives, pickled checkpoints, bad
configs. Each gets a defined outcome: a report row with its reason, or one clear error."""

from __future__ import annotations

import io
import resource
import stat
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import read_ingest_report, trusted_ingest_config
from generated import layouts
from generated.images import encoded, exif_rotated_jpeg, jpeg_claiming, png_claiming, sixteen_bit_png
from PIL import Image

from d2mtl import cli, contracts, layout
from d2mtl.config import ConfigError, load_experiment
from d2mtl.config.ingest import CsvManifestSpec, UTKFaceSpec
from d2mtl.config.train import TrainConfig
from d2mtl.engine import CHECKPOINT_FORMAT
from d2mtl.errors import UserError
from d2mtl.faces import ImageTooLarge, decode_rgb
from d2mtl.models import ModelError, build_model, load_model, save_model
from d2mtl.sources import open_tree
from d2mtl.sources.trees import ArchiveError
from d2mtl.stages import ingest, teacher

# ---- image files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [png_claiming(30000, 30000), png_claiming(9000, 9000), jpeg_claiming(30000, 30000)],
    ids=["png-30000", "png-9000", "jpeg-30000"],
)
def test_decompression_bomb_is_refused_from_its_header(data):
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=r"(pixels|\d+x\d+).* the limit of 64 megapixels; not decoded") as err:
        decode_rgb(data)
    assert err.value.reason == "image_too_large"
    assert time.perf_counter() - started < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024  # KiB: nothing allocated


def test_exif_orientation_is_applied_by_both_decoders():
    data = exif_rotated_jpeg()
    complete, with_trailing_bytes = decode_rgb(data), decode_rgb(data + b"junk")  # OpenCV path, PIL path
    for upright in (complete, with_trailing_bytes):
        assert upright.shape == (20, 10, 3)
        assert upright[:8].mean() > 200 and upright[-8:].mean() < 50  # the white half is on top


def test_cmyk_16_bit_and_misnamed_images_decode_to_rgb():
    colour = (200, 30, 40)
    cmyk = encoded(Image.new("RGB", (16, 16), colour).convert("CMYK"), "JPEG", quality=95)
    for data in (cmyk, cmyk + b"junk"):
        assert np.abs(decode_rgb(data)[8, 8].astype(int) - colour).max() <= 3
    for data in (sixteen_bit_png(), sixteen_bit_png() + b"junk", sixteen_bit_png("TIFF")):  # OpenCV, PIL, PIL
        ramp = decode_rgb(data)
        assert ramp.dtype == np.uint8 and ramp[0, :4, 0].tolist() == [0, 1, 2, 3] and ramp[-1, -1, 0] == 255
    ok, rgb16 = cv2.imencode(".png", np.stack([np.full((8, 8), 40000, np.uint16)] * 3, axis=-1))
    assert ok and decode_rgb(rgb16.tobytes())[0, 0].tolist() == [156] * 3  # 40000 / 257
    png = layouts.image_bytes(5, 24, fmt="PNG")
    assert np.array_equal(decode_rgb(png), np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


def corrupt_in_the_middle(data: bytes, seed: int = 1) -> bytes:
    """400 random bytes written over the middle of a JPEG, its start and end markers kept."""
    middle = len(data) // 2
    return data[:middle] + np.random.default_rng(seed).bytes(400) + data[middle + 400 :]


def test_each_odd_image_file_gets_its_outcome_in_the_ingest_report(tmp_path):
    folder = tmp_path / "utkface"
    files = {
        "truncated": layouts.image_bytes(1, 64)[:-300],
        "corrupt": corrupt_in_the_middle(layouts.image_bytes(1, 64)),
        "zero_byte": b"",
        "text": b"404 Not Found\n",
        "bomb": png_claiming(30000, 30000),
        "png_named_jpg": layouts.image_bytes(2, 40, fmt="PNG"),
        "cmyk": encoded(Image.new("RGB", (40, 40), (9, 99, 199)).convert("CMYK"), "JPEG"),
        "sixteen_bit": sixteen_bit_png(),
        "exif_rotated": exif_rotated_jpeg(),
    }
    names = {}
    for age, (kind, data) in enumerate(files.items(), start=20):
        names[kind] = f"{age}_0_0_2017011617452{age}.jpg.chip.jpg"
        layouts.write(folder / names[kind], data)
    summary = ingest.run(trusted_ingest_config(tmp_path, [UTKFaceSpec()]), str(tmp_path / "out"))
    report = read_ingest_report(tmp_path / "out")
    outcome = {row["source_uri"].rsplit("/", 1)[-1]: row["reason"] for row in report["rejects"]}
    assert {kind: outcome.get(name, "written") for kind, name in names.items()} == {
        "truncated": "unreadable_image",
        "corrupt": "unreadable_image",
        "zero_byte": "unreadable_image",
        "text": "unreadable_image",
        "bomb": "image_too_large",
        "png_named_jpg": "written",
        "cmyk": "written",
        "sixteen_bit": "written",
        "exif_rotated": "written",
    }
    assert summary["inputs"] == summary["written"] + summary["rejected"] == 9
    details = {row["source_uri"].rsplit("/", 1)[-1]: row["detail"] for row in report["rejects"]}
    assert details[names["corrupt"]] == "Corrupt JPEG data: premature end of data segment"
    assert details[names["text"]] == "cannot identify image file"  # no memory address: the same in every run
    assert details[names["bomb"]] == "900000000 pixels exceeds the limit of 64 megapixels; not decoded"


# ---- labels -------------------------------------------------------------------------------------------


def test_malformed_manifest_labels_become_report_rows(tmp_path):
    folder = tmp_path / "manifest"
    for i in range(5):
        layouts.write(folder / "img" / f"{i}.jpg", layouts.image_bytes(i))
    (folder / "labels.csv").write_text(
        "path,age,gender,expression\n"
        "img/0.jpg,31,female,happy\n"
        "img/1.jpg,130,male,\n"  # age out of range
        "img/2.jpg,-1,,\n"  # negative age
        "img/3.jpg,40,robot,\n"  # unknown class name
        "img/4.jpg,,,smirk\n"  # unknown expression
        "img/0.jpg,32,male,sad\n"
    )  # the same image again: a duplicate sample id
    summary = ingest.run(
        trusted_ingest_config(tmp_path, [CsvManifestSpec(name="m", path="manifest")]), str(tmp_path / "out")
    )
    report = read_ingest_report(tmp_path / "out")
    assert report["datasets"]["m"]["rejected_by_reason"] == {
        "duplicate_sample_id": 1,
        "label_out_of_range": 2,
        "unknown_class": 2,
    }
    assert summary["written"] == 1 and summary["inputs"] == 6
    labels = contracts.read_table(layout.labels(str(tmp_path / "out")), contracts.LABELS).to_pylist()
    assert [(row["age"], row["gender"], row["expression"]) for row in labels] == [(31.0, 1, 3)]  # the first row wins


def test_manifest_missing_its_label_columns_is_one_clear_error(tmp_path):
    folder = tmp_path / "manifest"
    layouts.write(folder / "img" / "0.jpg", layouts.image_bytes(0))
    (folder / "labels.csv").write_text("file,age\nimg/0.jpg,30\n")
    with pytest.raises(UserError, match=r"labels.csv: missing column\(s\) path; has file, age"):
        ingest.run(trusted_ingest_config(tmp_path, [CsvManifestSpec(name="m", path="manifest")]), str(tmp_path / "out"))


# ---- archives -----------------------------------------------------------------------------------------


def test_zip_with_an_absolute_member_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as archive:
        archive.writestr(zipfile.ZipInfo("/etc/cron.d/evil.jpg"), b"x")
    with (
        pytest.raises(ArchiveError, match=r"unsafe member '/etc/cron\.d/evil\.jpg'"),
        open_tree(str(tmp_path / "bad.zip")),
    ):
        pass


@pytest.mark.parametrize("target", ["../../../etc/passwd", "/etc/passwd"])
def test_zip_symlink_pointing_outside_is_refused(tmp_path, target):
    link = zipfile.ZipInfo("faces/link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as archive:
        archive.writestr("faces/ok.jpg", layouts.image_bytes(0))
        archive.writestr(link, target)
    with open_tree(str(tmp_path / "bad.zip")) as tree:
        assert tree.read("ok.jpg") == layouts.image_bytes(0)
        with pytest.raises(ArchiveError, match="unsafe member"):
            tree.read("link.jpg")


# ---- pickles ------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def malicious_pickle(marker: Path) -> bytes:
    """A torch checkpoint whose unpickling would run ``Path.touch(marker)``."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "model": Payload(marker)}, buffer)
    return buffer.getvalue()


def tiny_config(**overrides) -> TrainConfig:
    return TrainConfig(
        model={"weights": "none", "input_size": 32},
        batch_size=8,
        epochs=1,
        num_workers=0,
        progress=False,
        threads=1,
        lr={"schedule": "fixed"},
        **overrides,
    )


def test_malicious_pickle_checkpoint_is_refused_without_running_it(tiny_tables, tmp_path):
    out, marker = tmp_path / "teacher", tmp_path / "code_ran"
    layouts.write(out / layout.CHECKPOINT_FILE, malicious_pickle(marker))
    with pytest.raises(
        UserError,
        match=r"checkpoint.pt: not a d2mtl checkpoint \(.*UnpicklingError\); it was not "
        r"loaded. Use another --out, or --restart to train from the start$",
    ) as err:
        teacher.run(tiny_config(), tiny_tables["faces"], tiny_tables["labels"], str(out))
    assert "weights_only" not in str(err.value) and not marker.exists()  # never torch's advice to unpickle it
    torch.load(io.BytesIO(malicious_pickle(marker)), weights_only=False)
    assert marker.exists()  # the payload is live: a plain unpickling runs it


def test_malicious_pickle_checkpoint_is_one_line_through_the_cli(tiny_tables, tmp_path, capsys):
    out, marker = tmp_path / "teacher", tmp_path / "code_ran"
    layouts.write(out / layout.CHECKPOINT_FILE, malicious_pickle(marker))
    code = cli.main(
        [
            "teacher",
            "--set",
            "teacher.model.weights=none",
            "--set",
            "teacher.progress=false",
            "--faces",
            tiny_tables["faces"],
            "--labels",
            tiny_tables["labels"],
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and not marker.exists()


def test_malicious_pickle_as_model_weights_is_refused_without_running_it(tmp_path):
    model, marker = tmp_path / "model", tmp_path / "code_ran"
    save_model(build_model(tiny_config()), str(model), role="teacher")
    (model / layout.WEIGHTS_FILE).write_bytes(malicious_pickle(marker))
    with pytest.raises(ModelError, match="is not a safetensors file"):
        load_model(str(model))
    assert not marker.exists()


# ---- configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("teacher.epocs=3", "teacher.epocs: Extra inputs are not permitted"),
        ("teacher.epochs=three", "teacher.epochs: Input should be a valid integer"),
        (
            "teacher.tasks=[age,height]",
            "teacher.tasks: unknown task(s) height; known tasks: age, gender, race, expression",
        ),
        ("student.task_weights={hight: 2}", "student.task_weights: unknown task(s) hight"),
        ("pseudolabel.tasks=[]", "pseudolabel.tasks: empty task list"),
        ("pipeline.baseline_tasks=[age,mood]", "pipeline.baseline_tasks: unknown task(s) mood"),
        ("evaluate.in_domain={height: [utk]}", "evaluate.in_domain: unknown task(s) height"),
    ],
)
def test_bad_config_field_is_one_cli_line_naming_it(setting, message, capsys, tmp_path):
    code = cli.main(["teacher", "--set", setting, "--faces", "f", "--labels", "l", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("d2mtl teacher: error: invalid config cpu: ") and message in err


def test_config_file_with_unknown_field_and_wrong_type_names_both(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text("teacher:\n  batch_size: big\n  colour: blue\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(str(path))
    assert str(err.value) == (
        f"invalid config {path}: teacher.batch_size: Input should be a valid integer, unable "
        "to parse string as an integer; teacher.colour: Extra inputs are not permitted"
    )
