"""Small real media for tests: clips rendered from the real face photo, and broken files of each kind."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from affectprep.pipeline.demo import render_clip, render_frames


def face_clip(path: Path, num_frames: int = 24, label: str = "happy", seed: int = 0) -> Path:
    render_clip(label, path, seed=seed, num_frames=num_frames, size=(160, 120))
    return path


def frame_folder(folder: Path, num_frames: int = 12) -> Path:
    """JPEG frames named 1.jpg .. N.jpg (so a plain string sort would put 10.jpg before 2.jpg)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(render_frames("surprise", seed=2, num_frames=num_frames, size=(160, 120)), start=1):
        cv2.imwrite(str(folder / f"{i}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return folder


def broken_files(folder: Path) -> dict[str, Path]:
    """Each kind of unreadable video, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    good = face_clip(folder / "good.mp4")
    files = {"empty": folder / "empty.mp4", "garbage": folder / "garbage.mp4", "truncated": folder / "truncated.mp4",
             "missing": folder / "missing.mp4"}
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, np.uint8).tobytes())
    data = good.read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    return files
