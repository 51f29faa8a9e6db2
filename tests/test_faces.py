"""Decoding, alignment geometry and (on real faces) detection."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from generated import layouts

from d2mtl.config.ingest import DetectorConfig
from d2mtl.faces import (
    FaceDetector,
    UnreadableImage,
    align,
    center_crop_resize,
    decode_rgb,
    similarity_matrix,
    template,
)


def _similar(points: np.ndarray, scale: float, angle_deg: float, shift: tuple[float, float]) -> np.ndarray:
    theta = np.deg2rad(angle_deg)
    rotation = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return points @ rotation.T + np.array(shift)


@pytest.mark.parametrize(
    ("scale", "angle", "shift", "size"),
    [(2.0, 15.0, (40.0, -10.0), 112), (0.5, -30.0, (5.0, 7.0), 64), (3.3, 4.0, (-20.0, 60.0), 160)],
)
def test_similarity_maps_landmarks_onto_template(scale, angle, shift, size):
    source = _similar(template(112), scale, angle, shift)
    matrix = similarity_matrix(source, size)
    mapped = source @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, template(size), atol=0.05)


def test_warped_marks_land_on_template():
    """Draw a dot at each (transformed) landmark, warp, and find the dots where the template says."""
    source_points = _similar(template(112), 2.5, 20.0, (60.0, 30.0))
    canvas = np.zeros((400, 400, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for (x, y), colour in zip(source_points, colours, strict=True):
        cv2.circle(canvas, (round(x), round(y)), 6, colour, -1)
    warped = align(canvas, source_points, 112).astype(float)
    for (tx, ty), colour in zip(template(112), colours, strict=True):
        mask = np.all(np.abs(warped - colour) < 60, axis=2)
        ys, xs = np.nonzero(mask)
        assert len(xs) > 3
        assert abs(xs.mean() - tx) < 1.5 and abs(ys.mean() - ty) < 1.5


def test_degenerate_landmarks_raise_value_error():
    with pytest.raises(ValueError, match="degenerate"):
        similarity_matrix(np.zeros((5, 2), np.float32), 112)


def test_decode_gray_and_color_to_rgb():
    gray = decode_rgb(layouts.image_bytes(0, 48, gray=True))
    assert gray.shape == (48, 48, 3) and gray.dtype == np.uint8
    assert np.array_equal(gray[..., 0], gray[..., 2])
    assert decode_rgb(layouts.image_bytes(1, 30, fmt="PNG")).shape == (30, 30, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"not an image at all", "cannot identify"),
        (layouts.image_bytes(0, 64)[:300], "(?i)truncated"),
        (layouts.image_bytes(0, 64)[:-200], "(?i)truncated"),
    ],
)
def test_decode_refuses_bad_bytes(data, message):
    with pytest.raises(UnreadableImage, match=message):
        decode_rgb(data)


def test_center_crop_resize_takes_the_middle_square():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 100:200] = 255
    out = center_crop_resize(image, 50)
    assert out.shape == (50, 50, 3) and out.min() == 255


def test_detector_scale_upscales_small_and_shrinks_large():
    detector = FaceDetector(DetectorConfig(min_side=144, max_side=640))
    assert detector.scale_for(48, 48) == 3.0
    assert detector.scale_for(200, 200) == 1.0
    assert detector.scale_for(1280, 960) == 0.5


def test_detector_finds_no_face_in_noise():
    assert FaceDetector(DetectorConfig()).main_face(decode_rgb(layouts.image_bytes(0, 160))) is None


@pytest.mark.realdata
def test_detect_and_align_real_faces(shared_data):
    detector = FaceDetector(DetectorConfig())
    files = (
        sorted((shared_data / "utkface").glob("*.jpg"))[:10:3]
        + sorted((shared_data / "fer2013" / "test" / "happy").glob("*.jpg"))[:10:3]
    )
    found = 0
    for path in files:
        rgb = decode_rgb(path.read_bytes())
        face = detector.main_face(rgb)
        if face is None:
            continue
        found += 1
        _height, width = rgb.shape[:2]
        assert face.score >= 0.9
        assert -0.2 * width <= face.box[0] < face.box[2] <= 1.2 * width
        assert face.landmarks[0, 0] < face.landmarks[1, 0]  # left eye left of right eye, source pixels
        matrix = similarity_matrix(face.landmarks, 112)
        mapped = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
        assert np.abs(mapped - template(112)).max() < 12  # real faces fit the template up to expression / pose
        assert align(rgb, face.landmarks, 112).shape == (112, 112, 3)
    assert found >= len(files) - 1
