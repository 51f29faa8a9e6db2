"""Face photos drawn rather than photographed."""

from __future__ import annotations

import cv2
import numpy as np


def drawn_face(shift: int = 0) -> np.ndarray:
    """A cartoon face, RGB 240 x 240, that the RetinaFace detector finds (score ~0.998); ``shift`` moves the
    features so that drawn faces differ."""
    image = np.full((240, 240, 3), (200, 210, 220), np.uint8)
    cv2.ellipse(image, (120, 125), (70, 92), 0, 0, 360, (224, 172, 140), -1)  # face
    cv2.ellipse(image, (120, 60), (74, 45), 0, 180, 360, (60, 40, 30), -1)  # hair
    for x in (92 - shift, 148 + shift):  # eyes and brows
        cv2.ellipse(image, (x, 112), (15, 8), 0, 0, 360, (250, 250, 250), -1)
        cv2.circle(image, (x, 112), 6, (60, 40, 30), -1)
        cv2.circle(image, (x, 112), 3, (10, 10, 10), -1)
        cv2.line(image, (x - 16, 94), (x + 16, 92), (70, 50, 40), 4)
    cv2.line(image, (120, 115), (114, 150), (180, 120, 100), 3)  # nose
    cv2.line(image, (114, 150), (126, 152), (180, 120, 100), 3)
    cv2.ellipse(image, (120, 176 + shift), (24, 9), 0, 0, 180, (170, 60, 60), -1)  # mouth
    return cv2.GaussianBlur(image, (5, 5), 0)
