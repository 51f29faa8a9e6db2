"""Faces in, every attribute out: detection and alignment exactly as ingest does them, then one forward pass.

``Analyzer(model_uri).analyze(images)`` takes image files (local paths or ``s3://`` URIs), encoded bytes or RGB
arrays and returns one ``ImageResult`` per input, in input order, each with a ``FaceResult`` per detected face:
box, five landmarks, detection score, age (expected years and an interval of the DEX distribution), and for every
classification task (gender, race, expression) the most likely class, its probability and all probabilities.
An unreadable or missing file, or an image without a face, is a result whose ``status`` says so, never an error.

Faces are found with ingest's RetinaFace settings (``IngestConfig.detector``), aligned to its template at its
``image_size`` and JPEG-encoded at its quality, then go through the model card's eval transform: the network sees
faces exactly as it saw them in training. Faces of consecutive images are batched into one forward pass of
``inference.InferenceModel``, the graph that ``d2mtl.export`` also writes as ONNX and TorchScript.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, TextIO

import numpy as np
import torch
from pydantic import BaseModel

from d2mtl import data, layout, store
from d2mtl.config.ingest import IngestConfig
from d2mtl.errors import UserError
from d2mtl.faces import Detection, FaceDetector, UnreadableImage, align, decode_rgb, encode_jpeg
from d2mtl.inference import AGE_INTERVAL, InferenceModel
from d2mtl.models import load_model
from d2mtl.tasks import TASKS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # image left / right
FORMATS = ("json", "csv", "table")

ImageInput = str | os.PathLike | bytes | np.ndarray
Status = Literal["ok", "no_face", "unreadable", "not_found"]


# ---- results -----------------------------------------------------------------------------------


class AgeEstimate(BaseModel):
    years: float  # expected age
    low: float  # interval: the lower quantile of the age distribution (see Analyzer.age_interval)
    high: float  # interval: the upper quantile
    std: float  # spread of the distribution in years (0 for an l1 age head)


class ClassEstimate(BaseModel):
    label: str  # the most likely class
    probability: float  # its probability
    probabilities: dict[str, float]  # every class, in the task registry's order


class FaceResult(BaseModel):
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in source pixels (may reach past the image border)
    landmarks: list[tuple[float, float]]  # (x, y) of LANDMARK_NAMES, in source pixels
    detection_score: float
    age: AgeEstimate | None = None  # None when the model has no age head
    classes: dict[str, ClassEstimate] = {}  # per classification task of the model


class ImageResult(BaseModel):
    source: str  # path or URI; "<bytes N>" / "<array N>" for in-memory input number N
    status: Status
    reason: str | None = None  # why there is no face (status other than ok)
    width: int | None = None
    height: int | None = None
    faces: list[FaceResult] = []  # most confident first


@dataclass
class Located:
    """One input after detection and alignment, before the forward pass."""

    result: ImageResult  # faces still empty
    detections: list[Detection]
    jpegs: list[bytes]  # aligned faces, as ingest stores them


# ---- inputs ------------------------------------------------------------------------------------


def list_images(paths: Sequence[str]) -> list[str]:
    """Image files, folders (recursively: files with an image suffix) and ``s3://`` prefixes -> image URIs.

    A path that is neither a folder nor a prefix with images is kept as it is, so that a missing file becomes a
    ``not_found`` result; a folder or prefix without images is a UserError.
    """
    found: list[str] = []
    for path in paths:
        if store.is_remote(path):
            below = [uri for uri in store.list_files(path) if uri != path]
            if not below:
                found.append(path)  # a single object, or nothing: analyze() reports which
                continue
        elif Path(path).is_dir():
            below = store.list_files(path)
        else:
            found.append(path)
            continue
        images = [uri for uri in below if PurePosixPath(uri).suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise UserError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) below it")
        found += images
    return found


def source_name(image: ImageInput, number: int) -> str:
    if isinstance(image, bytes):
        return f"<bytes {number}>"
    if isinstance(image, np.ndarray):
        return f"<array {number}>"
    return os.fspath(image)


def load_rgb(image: ImageInput) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a path / URI, encoded bytes or array (RGB, or gray (H, W)).

    Raises FileNotFoundError or UnreadableImage."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise UnreadableImage(
                f"expected a uint8 RGB (H, W, 3) or gray (H, W) array, got {image.dtype} {image.shape}"
            )
        return np.stack([image] * 3, axis=-1) if image.ndim == 2 else image
    return decode_rgb(image if isinstance(image, bytes) else store.read_bytes(os.fspath(image)))


# ---- the analyzer ------------------------------------------------------------------------------


class Analyzer:
    """Detect, align and analyse faces with one multi-task model.

    ``model``: a model folder (teacher / student output). ``ingest``: the detector and alignment settings the
    model's training faces were made with (default: IngestConfig()). ``batch_size``: faces per forward pass.
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        ingest: IngestConfig | None = None,
        batch_size: int = 64,
        age_interval: float = AGE_INTERVAL,
    ):
        if batch_size < 1:
            raise UserError(f"batch size {batch_size} must be at least 1")
        self.net, self.card = load_model(model, device)
        self.device = next(self.net.parameters()).device
        # channels-last convolutions: ~1.5x faster batched on CPU here (MobileNetV2, 64 px), and what CUDA prefers
        self.graph = InferenceModel(self.net, age_interval).to(self.device, memory_format=torch.channels_last).eval()
        settings = ingest or IngestConfig()
        self.detector = FaceDetector(settings.detector, threads=torch.get_num_threads())
        self.face_size = self.card.face_size or settings.image_size  # the face size the model trained on
        if ingest is not None and ingest.image_size != self.face_size:
            log.warning(
                "%s was trained on %d px faces: aligning to %d px, not the given %d",
                model,
                self.face_size,
                self.face_size,
                ingest.image_size,
            )
        self.jpeg_quality = settings.jpeg_quality
        self.batch_size = batch_size

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.net.tasks

    def analyze(self, images: ImageInput | Iterable[ImageInput]) -> list[ImageResult]:
        """One result per input, in order."""
        return list(self.analyze_iter(images))

    def analyze_iter(self, images: ImageInput | Iterable[ImageInput]) -> Iterator[ImageResult]:
        """Results as they are ready: faces of consecutive images share forward passes of ``batch_size``."""
        if isinstance(images, (str, bytes, os.PathLike, np.ndarray)):
            images = [images]
        pending: list[Located] = []
        waiting_faces = 0
        for number, image in enumerate(images):
            located = self.locate(image, number)
            pending.append(located)
            waiting_faces += len(located.jpegs)
            if waiting_faces >= self.batch_size:
                yield from self.attach(pending)
                pending, waiting_faces = [], 0
        yield from self.attach(pending)

    def locate(self, image: ImageInput, number: int = 0) -> Located:
        """Decode, detect every face and align each as ingest does."""
        source = source_name(image, number)
        try:
            rgb = load_rgb(image)
        except FileNotFoundError:
            return Located(ImageResult(source=source, status="not_found", reason="no such file"), [], [])
        except UnreadableImage as err:
            return Located(ImageResult(source=source, status="unreadable", reason=str(err)), [], [])
        height, width = rgb.shape[:2]
        detections, jpegs = [], []
        reason = f"no face with detection score >= {self.detector.min_score}"
        for detection in sorted(self.detector.detect(rgb), key=lambda d: -d.score):
            try:
                jpegs.append(encode_jpeg(align(rgb, detection.landmarks, self.face_size), self.jpeg_quality))
                detections.append(detection)
            except ValueError as err:  # degenerate landmarks
                reason = str(err)
                log.warning("%s: face at %s skipped: %s", source, np.round(detection.box).tolist(), err)
        status: Status = "ok" if detections else "no_face"
        result = ImageResult(
            source=source, status=status, reason=None if detections else reason, width=width, height=height
        )
        return Located(result, detections, jpegs)

    def predict_faces(self, jpegs: Sequence[bytes]) -> dict[str, np.ndarray]:
        """Aligned face JPEGs -> ``InferenceModel`` outputs by name, in forward passes of ``batch_size``."""
        names = self.graph.output_names
        if not jpegs:
            return {name: np.zeros((0,)) for name in names}
        parts: list[tuple[torch.Tensor, ...]] = []
        with torch.inference_mode():
            for start in range(0, len(jpegs), self.batch_size):
                x = data.preprocess(
                    jpegs[start : start + self.batch_size],
                    self.card.input_size,
                    self.card.mean,
                    self.card.std,
                    self.device,
                )
                x = x.contiguous(memory_format=torch.channels_last)
                parts.append(tuple(t.cpu() for t in self.graph(x)))
        return {name: torch.cat([part[i] for part in parts]).numpy() for i, name in enumerate(names)}

    def attach(self, pending: list[Located]) -> Iterator[ImageResult]:
        """Run the forward pass for every face of ``pending`` and yield their completed results."""
        outputs = self.predict_faces([jpeg for located in pending for jpeg in located.jpegs])
        row = 0
        for located in pending:
            faces = []
            for detection in located.detections:
                faces.append(self.face_result(detection, {name: values[row] for name, values in outputs.items()}))
                row += 1
            yield located.result.model_copy(update={"faces": faces})

    def face_result(self, detection: Detection, outputs: dict[str, np.ndarray]) -> FaceResult:
        """One face's result; values rounded to what float32 outputs resolve (pixels 0.01, probabilities 1e-6)."""
        age, classes = None, {}
        for task in self.tasks:
            if TASKS[task].kind == "classification":
                probs = outputs[task].round(6)
                best = int(probs.argmax())
                names = TASKS[task].classes
                classes[task] = ClassEstimate(
                    label=names[best],
                    probability=float(probs[best]),
                    probabilities={n: float(p) for n, p in zip(names, probs, strict=True)},
                )
            else:
                age = AgeEstimate(
                    **{
                        field: round(float(outputs[name]), 2)
                        for field, name in (
                            ("years", task),
                            ("low", f"{task}_low"),
                            ("high", f"{task}_high"),
                            ("std", f"{task}_std"),
                        )
                    }
                )
        return FaceResult(
            box=tuple(round(float(v), 2) for v in detection.box),
            landmarks=[(round(float(x), 2), round(float(y), 2)) for x, y in detection.landmarks],
            detection_score=round(detection.score, 4),
            age=age,
            classes=classes,
        )


# ---- the latest model of `d2mtl run` -----------------------------------------------------------


def latest_model(run_root: str) -> str:
    """The final model of the latest ``d2mtl run`` under ``run_root`` (recorded in ``layout.LATEST_RUN``)."""
    record = Path(run_root, layout.LATEST_RUN)
    try:
        model = json.loads(record.read_text())["model"]
    except FileNotFoundError:
        raise UserError(
            f"no model given and no finished `d2mtl run` under {run_root} ({record} is missing); "
            "pass --model URI (a model folder: teacher / student output)"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{record} is not a run record ({type(err).__name__}: {err}); pass --model URI") from None
    return model


# ---- output formats ----------------------------------------------------------------------------


def csv_columns(tasks: Sequence[str]) -> list[str]:
    """One row per face (or per image without one): the columns for a model with ``tasks``."""
    columns = ["source", "status", "reason", "width", "height", "face", "detection_score", "x1", "y1", "x2", "y2"]
    columns += [f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy"]
    for task in tasks:
        if TASKS[task].kind == "classification":
            columns += [task, f"{task}_probability", *(f"{task}_{name}" for name in TASKS[task].classes)]
        else:
            columns += [task, f"{task}_low", f"{task}_high", f"{task}_std"]
    return columns


def csv_rows(result: ImageResult) -> Iterator[dict]:
    image = {
        "source": result.source,
        "status": result.status,
        "reason": result.reason or "",
        "width": result.width,
        "height": result.height,
    }
    if not result.faces:
        yield image
    for number, face in enumerate(result.faces):
        row = {
            **image,
            "face": number,
            "detection_score": face.detection_score,
            **dict(zip(("x1", "y1", "x2", "y2"), face.box, strict=True)),
        }
        for name, (x, y) in zip(LANDMARK_NAMES, face.landmarks, strict=True):
            row[f"{name}_x"], row[f"{name}_y"] = x, y
        if face.age is not None:
            row.update(age=face.age.years, age_low=face.age.low, age_high=face.age.high, age_std=face.age.std)
        for task, estimate in face.classes.items():
            row[task], row[f"{task}_probability"] = estimate.label, estimate.probability
            row.update({f"{task}_{name}": p for name, p in estimate.probabilities.items()})
        yield row


def table_line(result: ImageResult, face_number: int | None = None) -> str:
    if face_number is None:
        return f"{result.source}  {result.status}: {result.reason}"
    face = result.faces[face_number]
    x1, y1, x2, y2 = (round(v) for v in face.box)
    parts = [f"{result.source}  face {face_number}  box {x1},{y1},{x2},{y2}  score {face.detection_score:.2f}"]
    if face.age is not None:
        parts.append(f"age {face.age.years:.0f} ({face.age.low:.0f}-{face.age.high:.0f})")
    parts += [f"{task} {e.label} {e.probability:.2f}" for task, e in face.classes.items()]
    return "  ".join(parts)


def write_results(results: Iterable[ImageResult], fmt: str, stream: TextIO, tasks: Sequence[str]) -> dict[str, int]:
    """Stream results in ``fmt`` (json: one JSON object per image per line; csv: one row per face; table: one
    line per face); returns counts per status and of faces."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    counts = {"images": 0, "faces": 0}
    writer = None
    if fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=csv_columns(tasks), lineterminator="\n")
        writer.writeheader()
    for result in results:
        counts["images"] += 1
        counts["faces"] += len(result.faces)
        counts[result.status] = counts.get(result.status, 0) + 1
        if writer is not None:
            writer.writerows(csv_rows(result))
        elif fmt == "json":
            stream.write(result.model_dump_json() + "\n")
        else:
            lines = [table_line(result, n) for n in range(len(result.faces))] or [table_line(result)]
            stream.write("\n".join(lines) + "\n")
        stream.flush()
    return counts


# `d2mtl predict` exit codes beyond 0 (a face in some input, every input read) and 2 (a usage error, nothing read)
EXIT_NO_FACE = 3  # every input was read, none had a face: nothing was predicted
EXIT_BAD_INPUT = 4  # some input was unreadable or missing; faces were found in others
EXIT_NO_FACE_BAD_INPUT = 5  # some input was unreadable or missing, and no other had a face


def exit_code(counts: dict[str, int]) -> int:
    """The exit code of a ``write_results`` count."""
    bad_input = bool(counts.get("unreadable") or counts.get("not_found"))
    if counts["faces"]:
        return EXIT_BAD_INPUT if bad_input else 0
    return EXIT_NO_FACE_BAD_INPUT if bad_input else EXIT_NO_FACE


def summary_line(counts: dict[str, int]) -> str:
    others = ", ".join(
        f"{counts[s]} {s.replace('_', ' ')}" for s in ("no_face", "unreadable", "not_found") if counts.get(s)
    )
    return f"{counts['images']} image(s), {counts['faces']} face(s)" + (f"; {others}" if others else "")
