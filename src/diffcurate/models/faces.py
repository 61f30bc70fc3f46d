"""Face presence and count, from a detector whose weights ship inside its pip package.

No weights can be downloaded at run time, so the detector must bring its own. What was
checked (torch 2.14.1, numpy 2.4, Python 3.11):

* ``mediapipe`` 0.10.30 and later (1.x included) ship no models: their Tasks ``FaceDetector``
  needs a downloaded ``.tflite``. 0.10.21 and earlier bundle the BlazeFace models but require
  ``numpy<2`` (0.10.21) or ``protobuf<5``, ``jax`` and a numpy-1 build (0.10.14): not
  installable beside this environment;
* ``facenet-pytorch`` (MTCNN weights in the wheel) pins ``torch<2.3``;
* OpenCV 4.x wheels ship the Viola-Jones Haar cascades (``cv2.data.haarcascades``; OpenCV 5's
  wheels no longer do), installable as ``opencv-python-headless<5`` with numpy 2.

So the built-in detector is OpenCV's frontal-face Haar cascade: classic, fast on CPU, weaker
than a CNN on profiles, small faces (under 24 px) and unusual lighting. Counts are reported
with the detector that produced them; anything better can implement :class:`FaceDetector`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field


class FaceDetectorUnavailableError(RuntimeError):
    """Raised when no face detector can be loaded (OpenCV missing or without its cascades)."""


@runtime_checkable
class FaceDetector(Protocol):
    """Anything that counts faces in images.

    Attributes:
        name: What produced the counts (stored beside them).
        fingerprint: Digest of the weights and settings (stored beside the counts, so a count
            from another detector or setting is never mistaken for this one's).
    """

    name: str
    fingerprint: str

    def count(self, images: Sequence[Image.Image]) -> list[int]:
        """Number of faces found in each image."""
        ...


class HaarSettings(BaseModel):
    """OpenCV ``detectMultiScale`` settings of the Haar face detector.

    Attributes:
        cascade: Cascade file name inside ``cv2.data.haarcascades``.
        scale_factor: Image pyramid step.
        min_neighbors: Overlapping detections needed to keep one (higher: fewer false faces).
        min_size: Smallest face side in pixels (the cascade's window is 24 px).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    cascade: str = "haarcascade_frontalface_default.xml"
    scale_factor: float = Field(1.1, gt=1.0)
    min_neighbors: int = Field(5, ge=0)
    min_size: int = Field(24, ge=1)


class HaarFaceDetector:
    """OpenCV's Viola-Jones frontal-face cascade, loaded from the files in the cv2 wheel.

    Args:
        settings: Cascade and detection settings.

    Raises:
        FaceDetectorUnavailableError: OpenCV is not installed or ships no such cascade.
    """

    def __init__(self, settings: HaarSettings | None = None) -> None:
        self.settings = settings or HaarSettings()
        try:
            import cv2
        except ImportError as e:  # pragma: no cover - opencv is a dependency
            raise FaceDetectorUnavailableError(
                "OpenCV is not installed (pip install 'opencv-python-headless<5')"
            ) from e
        root = getattr(getattr(cv2, "data", None), "haarcascades", None)
        path = Path(root or "") / self.settings.cascade
        if root is None or not path.is_file():
            raise FaceDetectorUnavailableError(
                f"OpenCV {cv2.__version__} ships no {self.settings.cascade} (OpenCV 5 wheels "
                "dropped the Haar cascades; install opencv-python-headless<5)"
            )
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise FaceDetectorUnavailableError(f"could not load the cascade {path}")
        digest = hashlib.sha256(path.read_bytes())
        digest.update(self.settings.model_dump_json().encode())
        self.fingerprint = digest.hexdigest()[:24]
        self.name = f"opencv-{cv2.__version__}/{self.settings.cascade}"

    def count(self, images: Sequence[Image.Image]) -> list[int]:
        """Faces per image; images smaller than ``min_size`` have none by construction."""
        s = self.settings
        out = []
        for img in images:
            gray = np.asarray(img.convert("L"), dtype=np.uint8)
            if min(gray.shape) < s.min_size:
                out.append(0)
                continue
            found = self._cascade.detectMultiScale(
                gray, scaleFactor=s.scale_factor, minNeighbors=s.min_neighbors,
                minSize=(s.min_size, s.min_size),
            )  # fmt: skip
            out.append(len(found))
        return out


def load_face_detector(settings: HaarSettings | None = None) -> FaceDetector:
    """The built-in face detector (see the module docstring for why this one)."""
    return HaarFaceDetector(settings)
