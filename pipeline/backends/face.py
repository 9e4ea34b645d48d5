"""Face engine of the `faces` stage: detection, landmarks, tracking, smoothing and alignment.

    backend = load_face_backend("auto")          # once per worker
    clip = align_clip(frames, backend, size=224)  # per sample; NoFaceError when no frame shows a face

Backends: "haar" (OpenCV cascades + mean face shape; offline, no weights), "fan" (face-alignment's FAN landmarks
on S3FD or Haar boxes; weights from the torch hub cache), "auto" (fan when its weights are cached, else haar).
"""
from __future__ import annotations

from .face_align import NO_FACE_POLICIES, AlignedClip, align_clip, canonical_landmarks
from .face_common import MEAN_SHAPE, Detection, FaceBackend, NoFaceError
from .face_fan import FanBackend, face_alignment_installed, fan_weights_present, s3fd_weights_present
from .face_haar import HaarBackend

__all__ = [
    "MEAN_SHAPE", "NO_FACE_POLICIES", "AlignedClip", "Detection", "FaceBackend", "FanBackend", "HaarBackend",
    "NoFaceError", "align_clip", "canonical_landmarks", "fan_weights_present", "load_face_backend",
]

BACKENDS = ("auto", "haar", "fan")
_OPTIONS = {"haar": {"detect_max_side", "scale_factor", "min_neighbors", "min_face", "scan_every"},
            "fan": {"detector", "flip_input", "detect_max_side"}}


def load_face_backend(name: str = "auto", *, device: str = "cpu", **options) -> FaceBackend:
    """Build a face backend (load it once per worker and reuse it).

    "auto" picks "fan" when face-alignment is installed and the FAN weights are in the torch hub cache (with the
    S3FD detector when its weights are cached too, else Haar boxes), else "haar"; options meant only for the
    backend it did not pick are dropped.
    `device` matters to "fan" only.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown face backend {name!r}; choose one of {BACKENDS}")
    unknown = set(options) - _OPTIONS["haar"] - _OPTIONS["fan"]
    if unknown:
        raise ValueError(f"unknown face backend options {sorted(unknown)}; known: "
                         f"{sorted(_OPTIONS['haar'] | _OPTIONS['fan'])}")
    if name == "auto":
        name = "fan" if face_alignment_installed() and fan_weights_present() else "haar"
        options = {key: value for key, value in options.items() if key in _OPTIONS[name]}
        if name == "fan":
            options.setdefault("detector", "sfd" if s3fd_weights_present() else "haar")
    misplaced = set(options) - _OPTIONS[name]
    if misplaced:
        raise ValueError(f"the {name!r} face backend takes no options {sorted(misplaced)}; "
                         f"it takes {sorted(_OPTIONS[name])}")
    if name == "haar":
        return HaarBackend(**options)
    return FanBackend(device=device, **options)
