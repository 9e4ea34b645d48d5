"""Types shared by the face backends, the 68-point mean face shape, and small landmark helpers.

Landmarks follow the iBUG 300-W / dlib 68-point order in (x, y) pixel coordinates. "Left" and "right" below are
image sides, not the subject's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from affectprep import schema

IMAGE_LEFT_EYE = slice(36, 42)
IMAGE_RIGHT_EYE = slice(42, 48)
OUTER_MOUTH = slice(48, 60)


class NoFaceError(Exception):
    """No face was detected in any frame of a clip."""


@dataclass
class Detection:
    """The tracked face in one frame."""

    box: np.ndarray        # (4,) float32 x0, y0, x1, y1 in source pixels, as the detector gave it
    landmarks: np.ndarray  # (68, 2) float32 in source pixels
    score: float           # detector confidence; its scale depends on the backend


class FaceBackend(Protocol):
    name: str              # "fan" | "dlib" | "haar"
    landmark_source: str   # "fan" | "dlib" | "template"

    @property
    def identity(self) -> dict:
        """What decides the backend's output (versions, weights, options), for cache keys."""
        ...

    def detect(self, frames: np.ndarray) -> list[Detection | None]:
        """One entry per frame of `frames` (N, H, W, 3) uint8 RGB: the face that continues the track, or None."""
        ...


def _load_mean_shape() -> np.ndarray:
    path = Path(__file__).parent / "data" / "mean_face_68.csv"
    shape = np.loadtxt(path, delimiter=",", comments="#", dtype=np.float32)
    if shape.shape != (schema.NUM_LANDMARKS, 2):
        raise RuntimeError(f"{path} holds {shape.shape} values, expected ({schema.NUM_LANDMARKS}, 2)")
    return shape


# OpenFace's mean face, in units of the dlib detector box (the face spans about 0.08..0.97 x 0.18..1.06).
MEAN_SHAPE = _load_mean_shape()


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image-left and image-right eye centres of (..., 68, 2) landmarks, each (..., 2)."""
    return landmarks[..., IMAGE_LEFT_EYE, :].mean(axis=-2), landmarks[..., IMAGE_RIGHT_EYE, :].mean(axis=-2)


def mouth_centre(landmarks: np.ndarray) -> np.ndarray:
    return landmarks[..., OUTER_MOUTH, :].mean(axis=-2)


def shape_through_eyes(left_eye: np.ndarray, right_eye: np.ndarray) -> np.ndarray:
    """The mean shape moved, scaled and rotated (a similarity transform) so its eye centres land on the given ones."""
    template_left, template_right = eye_centres(MEAN_SHAPE)
    # With points as complex numbers, a similarity transform fixed by two points is one ratio (scale and rotation).
    zoom = _as_complex(right_eye - left_eye) / _as_complex(template_right - template_left)
    shape = _as_complex(left_eye) + zoom * _as_complex(MEAN_SHAPE - template_left)
    return np.stack([shape.real, shape.imag], axis=-1).astype(np.float32)


def _as_complex(points: np.ndarray) -> np.ndarray:
    return points[..., 0] + 1j * points[..., 1]


def check_frames(frames: np.ndarray) -> np.ndarray:
    """Frames as (N, H, W, 3) uint8 RGB, or a ValueError saying what is wrong with them."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (N, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB, got {frames.dtype}")
    if 0 in frames.shape:
        raise ValueError(f"frames must not be empty, got shape {frames.shape}")
    return frames


def downscale(frame: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The frame shrunk so its longest side is at most `max_side`, and the factor applied (1.0 if none)."""
    height, width = frame.shape[:2]
    factor = max_side / max(height, width)
    if factor >= 1.0:
        return frame, 1.0
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA), factor
