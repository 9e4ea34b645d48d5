"""The bundled demo dataset: short clips in DFEW's official layout, made from a real face photo.

The face is `skimage.data.astronaut()` (Eileen Collins, public domain). Each clip frames the photo with a random
camera (scale, position, slow drift, small roll, lighting, sensor noise) and animates a facial expression whose
motion depends on the label, following FACS action units with onset, apex and offset. Every clip also blinks and
drifts, so the label is carried by the expression alone.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# DFEW's official label codes 1..7.
DFEW_LABELS = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")

# Keypoints of the astronaut photo (512x512), located by eye on the image: x, y.
_POINTS = {
    "brow_l_in": (214, 90), "brow_l_out": (193, 89), "brow_r_in": (234, 91), "brow_r_out": (256, 93),
    "lid_l": (202, 97), "lid_r": (247, 100), "low_lid_l": (202, 105), "low_lid_r": (247, 107),
    "cheek_l": (200, 122), "cheek_r": (248, 123), "nose_l": (216, 121), "nose_r": (233, 121),
    "lip_up": (224, 139), "lip_low": (224, 153), "corner_l": (204, 145), "corner_r": (243, 145),
    "chin": (224, 174), "jaw_l": (200, 165), "jaw_r": (248, 165),
}
_FACE_CENTRE = (224.0, 125.0)
_FACE_HEIGHT = 130.0   # brows to chin, in photo pixels

# Apex displacement (dx, dy) in photo pixels per keypoint, by FACS action unit.
_AUS = {
    "AU1": {"brow_l_in": (0, -5), "brow_r_in": (0, -5)},                                  # inner brow raiser
    "AU2": {"brow_l_out": (0, -5), "brow_r_out": (0, -5)},                                # outer brow raiser
    "AU4": {"brow_l_in": (4, 4), "brow_r_in": (-4, 4), "brow_l_out": (1, 2), "brow_r_out": (-1, 2)},  # lowerer
    "AU6": {"cheek_l": (0, -4), "cheek_r": (0, -4), "low_lid_l": (0, -2), "low_lid_r": (0, -2)},      # cheek raiser
    "AU7": {"low_lid_l": (0, -2), "low_lid_r": (0, -2), "lid_l": (0, 1), "lid_r": (0, 1)},           # lid tightener
    "AU9": {"nose_l": (1, -4), "nose_r": (-1, -4), "brow_l_in": (0, 2), "brow_r_in": (0, 2)},        # nose wrinkler
    "AU10": {"lip_up": (0, -4)},                                                          # upper lip raiser
    "AU12": {"corner_l": (-4, -5), "corner_r": (4, -5)},                                  # lip corner puller
    "AU15": {"corner_l": (-1, 5), "corner_r": (1, 5)},                                    # lip corner depressor
    "AU20": {"corner_l": (-6, 1), "corner_r": (6, 1)},                                    # lip stretcher
    "AU23": {"corner_l": (2, 0), "corner_r": (-2, 0), "lip_up": (0, 2), "lip_low": (0, -2)},          # lip tightener
    "AU26": {"lip_low": (0, 6), "chin": (0, 6), "jaw_l": (0, 5), "jaw_r": (0, 5)},      # jaw drop
}
EXPRESSIONS = {
    "happy": ("AU6", "AU12"),
    "sad": ("AU1", "AU15"),
    "angry": ("AU4", "AU7", "AU23"),
    "surprise": ("AU1", "AU2", "AU26"),
    "disgust": ("AU9", "AU10"),
    "fear": ("AU1", "AU2", "AU4", "AU20"),
    "neutral": (),
}
_BLINK = {"lid_l": (0, 5), "lid_r": (0, 5)}
_SIGMA = 9.0                       # spread of each keypoint's pull, photo pixels
_STRENGTH = 1.5                    # apex displacements are these many times the table's
_ROI = (150, 40, 300, 210)         # x0, y0, x1, y1: the part of the photo the warps touch


@dataclass(frozen=True)
class _Camera:
    scale: float      # face height as a share of the frame height
    cx: float         # face centre, share of the frame width / height
    cy: float
    drift: tuple[float, float]
    roll: float       # degrees, amplitude of a slow sway
    gain: float


def _photo() -> np.ndarray:
    from skimage.data import astronaut
    return np.ascontiguousarray(astronaut())


def _field(moves: dict[str, tuple[float, float]], grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Displacement field (2, H, W) over the ROI that moves the content at each keypoint by its (dx, dy), with a
    Gaussian falloff around it."""
    gx, gy = grid
    field = np.zeros((2, *gx.shape), np.float32)
    for key, (dx, dy) in moves.items():
        px, py = _POINTS[key]
        w = np.exp(-((gx - px) ** 2 + (gy - py) ** 2) / (2 * _SIGMA ** 2))
        field[0] += _STRENGTH * dx * w
        field[1] += _STRENGTH * dy * w
    return field


def _warp_roi(photo: np.ndarray, field: np.ndarray, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    x0, y0, x1, y1 = _ROI
    out = photo.copy()
    # Backward mapping: a pixel shows what lay one displacement behind it (a good inverse for small pulls).
    out[y0:y1, x0:x1] = cv2.remap(photo, grid[0] - field[0], grid[1] - field[1], cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
    return out


def _envelope(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Onset - apex - offset intensity over normalised time t in [0, 1)."""
    onset = rng.uniform(0.05, 0.3)
    rise = rng.uniform(0.15, 0.3)
    hold = rng.uniform(0.2, 0.4)
    fall = rng.uniform(0.15, 0.3)
    up = np.clip((t - onset) / rise, 0, 1)
    down = np.clip((t - onset - rise - hold) / fall, 0, 1)
    smooth = lambda x: x * x * (3 - 2 * x)  # noqa: E731
    return smooth(up) * (1 - 0.7 * smooth(down))


def render_frames(label: str, *, seed: int, num_frames: int = 40,
                  size: tuple[int, int] = (320, 240)) -> list[np.ndarray]:
    """RGB frames of one demo clip."""
    if label not in EXPRESSIONS:
        raise ValueError(f"unknown demo label {label!r}; choose from {sorted(EXPRESSIONS)}")
    rng = np.random.default_rng(seed)
    photo = _photo()
    width, height = size
    cam = _Camera(scale=rng.uniform(0.35, 0.6), cx=rng.uniform(0.35, 0.65), cy=rng.uniform(0.4, 0.6),
                  drift=(rng.uniform(-0.08, 0.08), rng.uniform(-0.05, 0.05)), roll=rng.uniform(0, 6),
                  gain=rng.uniform(0.8, 1.15))
    x0, y0, x1, y1 = _ROI
    grid = np.meshgrid(np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32))
    t = np.arange(num_frames) / max(1, num_frames - 1)
    intensity = _envelope(t, rng) * rng.uniform(0.7, 1.3)
    blink_at = rng.uniform(0, 1)
    moves: dict[str, tuple[float, float]] = {}
    for au in EXPRESSIONS[label]:
        for key, (dx, dy) in _AUS[au].items():
            mx, my = moves.get(key, (0.0, 0.0))
            moves[key] = (mx + dx, my + dy)
    expression, blink_field = _field(moves, grid), _field(_BLINK, grid)
    zoom = cam.scale * height / _FACE_HEIGHT
    phase = rng.uniform(0, 2 * math.pi)
    noise = rng.normal(0, 2.0, (4, height, width, 3)).astype(np.int16)
    frames = []
    for i, ti in enumerate(t):
        blink = max(0.0, 1 - abs(float(ti) - blink_at) / 0.06)
        amount = float(intensity[i])
        warped = photo if amount < 1e-3 and not blink else \
            _warp_roi(photo, amount * expression + blink * blink_field, grid)
        cx = (cam.cx + cam.drift[0] * ti) * width
        cy = (cam.cy + cam.drift[1] * ti) * height
        angle = cam.roll * math.sin(2 * math.pi * ti + phase)
        m = cv2.getRotationMatrix2D(_FACE_CENTRE, angle, zoom)
        m[:, 2] += (cx - _FACE_CENTRE[0], cy - _FACE_CENTRE[1])
        frame = cv2.warpAffine(warped, m, size, flags=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
        flicker = cam.gain * (1 + 0.03 * math.sin(7 * ti + phase))
        # Integer arithmetic and a small bank of noise images: float maths on every pixel dominated the cost.
        pixels = cv2.convertScaleAbs(frame, alpha=flicker).astype(np.int16) + noise[i % len(noise)]
        frames.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return frames


def write_video(frames: Iterable[np.ndarray], path: Path, fps: int = 25) -> None:
    """RGB uint8 frames to an H.264 mp4 (MPEG-4 part 2 where the PyAV build has no libx264)."""
    import av
    frames = list(frames)
    height, width = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width - width % 2, height - height % 2
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "23", "preset": "veryfast"}
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:stream.height, :stream.width]),
                                               format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def render_clip(label: str, path: Path, *, seed: int, num_frames: int = 40,
                size: tuple[int, int] = (320, 240)) -> None:
    write_video(render_frames(label, seed=seed, num_frames=num_frames, size=size), path)


def _render_job(job: tuple[str, Path, int, int]) -> None:
    label, path, seed, num_frames = job
    render_clip(label, path, seed=seed, num_frames=num_frames)


def make_demo_dataset(out: Path, clips: int = 70, seed: int = 0) -> Path:
    """Write `clips` clips, labels balanced round-robin, and DFEW's 5-fold split files. Returns the dataset root."""
    out = Path(out)
    media = out / "Clip" / "original"
    media.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(clips)            # folds independent of labels
    folds = {int(i): int(f) % 5 + 1 for f, i in enumerate(order)}
    rows = [(f"{i + 1:05d}", i % len(DFEW_LABELS) + 1, folds[i]) for i in range(clips)]
    lengths = rng.integers(32, 49, clips)
    jobs = [(DFEW_LABELS[code - 1], media / f"{name}.mp4", seed * 100_003 + i, int(lengths[i]))
            for i, (name, code, _) in enumerate(rows)]
    with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        list(pool.map(_render_job, jobs, chunksize=4))
    write_dfew_splits(out, rows)
    return out


def write_dfew_splits(root: Path, rows: list[tuple[str, int, int]]) -> None:
    """DFEW's 5-fold split files for (clip name, label code 1..7, test fold) rows: each clip is in the test set of
    its fold and in the train set of the four others."""
    for split in ("train", "test"):
        folder = root / "EmoLabel_DataSplit" / f"{split}(single-labeled)"
        folder.mkdir(parents=True, exist_ok=True)
        for fold in range(1, 6):
            chosen = [r for r in rows if (r[2] == fold) == (split == "test")]
            text = "video_name,label\n" + "".join(f"{name},{code}\n" for name, code, _ in chosen)
            (folder / f"set_{fold}.csv").write_text(text)
