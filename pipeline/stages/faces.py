"""`faces`: decode the sampled frames, detect and landmark the face, smooth over time, align to 224x224 crops."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..backends.face import NoFaceError, align_clip, load_face_backend
from ..media import MediaError, read_frames
from ..stage import SampleError, Stage


@dataclass(frozen=True)
class FacesConfig:
    # auto = fan when its weights are in the torch hub cache, else dlib when installed, else haar
    backend: Literal["auto", "fan", "dlib", "haar"] = "auto"
    # fan: "sfd" | "haar" boxes (default sfd when its weights are cached); dlib: "hog" (default) | "cnn"
    detector: Literal["sfd", "haar", "hog", "cnn"] | None = None
    device: str = "cpu"
    size: int = 224
    margin: float = 0.25                                     # share of the face height added on each side
    smooth: int = 5                                          # moving-average window over time, in sampled frames
    no_face: Literal["fail", "center_crop"] = "fail"
    jpeg_quality: int = 90
    decoder: Literal["auto", "decord", "pyav"] = "auto"


class FacesStage(Stage):
    name = "faces"
    version = 1
    Config = FacesConfig
    reads = {"index": ("media_path", "media_kind"),
             "frames": ("frame_indices", "num_views", "frames_per_view")}
    media_kinds = frozenset({"video", "frames", "image"})

    def _load(self):
        c = self.config
        options = {"detector": c.detector} if c.detector and c.backend != "haar" else {}
        return load_face_backend(c.backend, device=c.device, **options)

    def identity(self) -> dict[str, Any]:
        # Resolves "auto" on this machine, so the key says which backend (and which weights) made the crops.
        return self._load().identity

    def setup(self) -> None:
        import cv2
        cv2.setNumThreads(1)  # one worker process per core already; OpenCV's own threads would oversubscribe
        self.face = self._load()

    def process_one(self, row: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        wanted = row["frame_indices"]
        # Detect on each distinct frame once, in temporal order, so smoothing sees real time; views and padding
        # repeat frames, which are gathered back afterwards.
        unique = sorted(set(wanted))
        try:
            frames = read_frames(Path(row["media_path"]), row["media_kind"], unique, decoder=c.decoder)
        except MediaError as e:
            raise SampleError(str(e)) from None
        try:
            clip = align_clip(frames, self.face, size=c.size, margin=c.margin, smooth=c.smooth,
                              no_face=c.no_face, jpeg_quality=c.jpeg_quality)
        except NoFaceError as e:
            raise SampleError(str(e)) from None
        pos = np.searchsorted(unique, wanted)
        return {
            "frame_indices": wanted,
            "num_views": row["num_views"],
            "frames_per_view": row["frames_per_view"],
            "crops": [clip.crops[i] for i in pos],
            "landmarks": clip.landmarks.reshape(len(unique), -1)[pos].tolist(),
            "boxes": clip.boxes[pos].tolist(),
            "detected": clip.detected[pos].tolist(),
            "size": c.size,
            "backend": clip.backend,
            "landmark_source": clip.landmark_source,
        }

