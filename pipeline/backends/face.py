"""Face engine of the `faces` stage: detection, landmarks, tracking, smoothing and alignment.

    backend = load_face_backend("auto")          # once per worker (per thread: backends are not thread-safe)
    clip = align_clip(frames, backend, size=224)  # per sample; NoFaceError when no frame shows a face

Backends: "fan" (face-alignment's FAN landmarks on S3FD or Haar boxes; weights from the torch hub cache; the most
accurate), "dlib" (dlib HOG or CNN detection and its 68-point predictor, offline; the model is for non-commercial
use), "haar" (OpenCV cascades + mean face shape; offline, no weights, landmarks only an estimate), "auto" (fan when
its weights are cached, else dlib when installed, else haar).
"""
from __future__ import annotations

from .face_align import NO_FACE_POLICIES, AlignedClip, align_clip, canonical_landmarks
from .face_common import MEAN_SHAPE, Detection, FaceBackend, NoFaceError
from .face_dlib import DlibBackend, dlib_installed
from .face_fan import FanBackend, face_alignment_installed, fan_weights_present, s3fd_weights_present
from .face_haar import HaarBackend

__all__ = [
    "MEAN_SHAPE", "NO_FACE_POLICIES", "AlignedClip", "Detection", "DlibBackend", "FaceBackend", "FanBackend",
    "HaarBackend", "NoFaceError", "align_clip", "canonical_landmarks", "dlib_installed", "fan_weights_present",
    "load_face_backend", "offline_backend", "resolve_auto",
]

BACKENDS = ("auto", "fan", "dlib", "haar")
_OPTIONS = {"haar": {"detect_max_side", "scale_factor", "min_neighbors", "min_face", "scan_every"},
            "fan": {"detector", "flip_input", "detect_max_side"},
            "dlib": {"detector", "min_face", "scan_every"}}
_ALL_OPTIONS = set().union(*_OPTIONS.values())
# Option values that only one backend takes: under "auto", a detector the picked backend does not have is dropped.
_DETECTORS = {"fan": ("sfd", "haar"), "dlib": ("hog", "cnn"), "haar": ()}


def offline_backend() -> str:
    """The best backend that needs no download: "dlib" when installed, else "haar"."""
    return "dlib" if dlib_installed() else "haar"


def resolve_auto() -> str:
    """What "auto" picks on this machine: "fan" when face-alignment is installed and the FAN weights are in the
    torch hub cache, else `offline_backend()`."""
    return "fan" if face_alignment_installed() and fan_weights_present() else offline_backend()


def load_face_backend(name: str = "auto", *, device: str = "cpu", **options) -> FaceBackend:
    """Build a face backend (load it once per worker thread and reuse it).

    "auto" picks as `resolve_auto` says (FAN with the S3FD detector when its weights are cached too, else with
    Haar boxes); options meant only for the backends it did not pick are dropped. `device` matters to "fan" only.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown face backend {name!r}; choose one of {BACKENDS}")
    unknown = set(options) - _ALL_OPTIONS
    if unknown:
        raise ValueError(f"unknown face backend options {sorted(unknown)}; known: {sorted(_ALL_OPTIONS)}")
    if name == "auto":
        name = resolve_auto()
        options = {key: value for key, value in options.items() if key in _OPTIONS[name]
                   and (key != "detector" or value in _DETECTORS[name])}
        if name == "fan":
            options.setdefault("detector", "sfd" if s3fd_weights_present() else "haar")
    misplaced = set(options) - _OPTIONS[name]
    if misplaced:
        raise ValueError(f"the {name!r} face backend takes no options {sorted(misplaced)}; "
                         f"it takes {sorted(_OPTIONS[name])}")
    if name == "haar":
        return HaarBackend(**options)
    if name == "dlib":
        return DlibBackend(**options)
    return FanBackend(device=device, **options)
