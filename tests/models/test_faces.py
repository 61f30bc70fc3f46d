"""The bundled face detector (OpenCV's Haar cascade from the cv2 wheel) on real photographs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from diffcurate.models.faces import (
    FaceDetector,
    FaceDetectorUnavailableError,
    HaarFaceDetector,
    HaarSettings,
    load_face_detector,
)


def test_counts_faces_in_real_photos_and_none_elsewhere():
    detector = load_face_detector()
    assert isinstance(detector, FaceDetector)
    astronaut = Image.fromarray(data.astronaut()).resize((256, 256))
    pair = Image.new("RGB", (512, 256))
    pair.paste(astronaut, (0, 0))
    pair.paste(astronaut, (256, 0))
    coffee = Image.fromarray(data.coffee())
    blank = Image.new("RGB", (128, 128), (127, 127, 127))
    digit = Image.fromarray(np.zeros((8, 8), np.uint8))  # smaller than the 24 px window
    assert detector.count([astronaut, pair, coffee, blank, digit]) == [1, 2, 0, 0, 0]


def test_name_and_fingerprint_follow_the_settings():
    a = HaarFaceDetector()
    b = HaarFaceDetector(HaarSettings(min_neighbors=8))
    assert a.name.startswith("opencv-4.") and a.name.endswith("haarcascade_frontalface_default.xml")
    assert a.fingerprint != b.fingerprint and len(a.fingerprint) == 24
    with pytest.raises(FaceDetectorUnavailableError, match="ships no"):
        HaarFaceDetector(HaarSettings(cascade="no_such_cascade.xml"))
