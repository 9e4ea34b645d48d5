"""`motion`: an offline captioner with no weights. It describes where and when the aligned face moves, in FACS
terms, from dense optical flow measured in regions placed by the landmarks. The demo uses it, and so does any run
with no captioning model configured. Its landmarks may be a mean-shape estimate that does not move (Haar backend),
so motion is always measured in the images, and landmarks only say where the regions are."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

VERSION = 1
SIDE = 112   # crops are measured at this size: enough for facial motion, cheap for optical flow


@dataclass(frozen=True)
class _Region:
    name: str
    points: tuple[tuple[int, ...], ...]   # landmark indices (iBUG 68, 0-based) per side; mean of each group
    words: dict[str, tuple[str, str]]     # direction -> (movement, FACS action unit)


# Direction words: "up"/"down" in the image, "out"/"in" = away from / towards the face's vertical midline.
_REGIONS = (
    _Region("inner brows", ((21,), (22,)), {"up": ("the inner brows raise", "AU1"),
                                            "down": ("the brows lower", "AU4"),
                                            "in": ("the brows draw together", "AU4")}),
    _Region("outer brows", ((17, 18), (25, 26)), {"up": ("the outer brows raise", "AU2"),
                                                  "down": ("the outer brows lower", "AU4")}),
    _Region("upper lids", ((37, 38), (43, 44)), {"down": ("the upper lids lower", "AU43"),
                                                 "up": ("the upper lids raise", "AU5")}),
    _Region("lower lids", ((40, 41), (46, 47)), {"up": ("the lower lids tighten", "AU7")}),
    _Region("cheeks", ((1, 31, 48), (15, 35, 54)), {"up": ("the cheeks raise", "AU6")}),
    _Region("nose", ((31,), (35,)), {"up": ("the nose wrinkles", "AU9")}),
    _Region("upper lip", ((50, 51, 52),), {"up": ("the upper lip raises", "AU10"),
                                           "down": ("the upper lip presses down", "AU23")}),
    _Region("lip corners", ((48,), (54,)), {"up": ("the lip corners pull up and outward", "AU12"),
                                            "down": ("the lip corners pull down", "AU15"),
                                            "out": ("the lips stretch sideways", "AU20"),
                                            "in": ("the lip corners tighten inward", "AU23")}),
    _Region("jaw", ((57, 8),), {"down": ("the lower lip and jaw drop", "AU26"),
                                "up": ("the lower lip pushes up", "AU17")}),
)


class MotionCaptioner:
    name = "motion"

    def __init__(self, *, threshold: float = 0.04, window: float = 0.07, most: int = 4):
        """threshold: the smallest movement described, as a share of the distance between the eyes.
        window: half-size of the square each region's motion is averaged over, as a share of the crop side.
        most: the largest movements described, at most."""
        self.threshold, self.window, self.most = threshold, window, most

    @property
    def identity(self) -> dict:
        return {"captioner": "motion", "version": VERSION, "threshold": self.threshold, "window": self.window,
                "most": self.most}

    def caption(self, crops: Sequence[bytes], landmarks: np.ndarray, frames_per_view: int) -> str:
        crops = list(crops)[:frames_per_view]
        if len(crops) < 2:
            return "A single frame: no facial movement can be seen."
        gray = [cv2.imdecode(np.frombuffer(c, np.uint8), cv2.IMREAD_GRAYSCALE) for c in crops]
        scale = SIDE / gray[0].shape[1]
        gray = [cv2.resize(g, (SIDE, SIDE), interpolation=cv2.INTER_AREA) for g in gray]
        points = np.asarray(landmarks, np.float32).reshape(len(landmarks), -1, 2)[: len(gray)].mean(axis=0) * scale
        midline = points[27:31, 0].mean()
        eyes = np.linalg.norm(points[36:42].mean(axis=0) - points[42:48].mean(axis=0))
        tracks = self._tracks(gray, points, midline)
        found = []
        for region, track in zip(_REGIONS, tracks):
            described = _describe(region, track, eyes, self.threshold, len(gray))
            if described:
                found.append(described)
        n = len(gray)
        if not found:
            return f"No clear facial movement: the face stays still across the {n} frames."
        found.sort(key=lambda d: -d[0])
        return f"Over {n} frames, " + "; ".join(text for _, text in found[: self.most]) + "."

    def _tracks(self, gray: list[np.ndarray], points: np.ndarray, midline: float) -> list[np.ndarray]:
        """Per region, its displacement from the first frame at each frame, as (T, 2) [outward, up] in pixels."""
        half = max(2, round(self.window * SIDE))
        steps = [cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 2, 11, 3, 5, 1.1, 0) for a, b in zip(gray, gray[1:])]
        tracks = []
        for region in _REGIONS:
            per_side = []
            for group in region.points:
                x, y = points[list(group)].mean(axis=0)
                outward = -1.0 if x < midline else 1.0
                x0, x1 = int(max(0, x - half)), int(min(SIDE, x + half + 1))
                y0, y1 = int(max(0, y - half)), int(min(SIDE, y + half + 1))
                # Each step's flow minus the whole face's median flow: what is left is the face's own motion.
                moves = [f[y0:y1, x0:x1].reshape(-1, 2).mean(axis=0) - np.median(f.reshape(-1, 2), axis=0)
                         for f in steps]
                moves = np.array([[m[0] * outward if len(region.points) > 1 else 0.0, -m[1]] for m in moves])
                per_side.append(np.vstack([np.zeros((1, 2)), np.cumsum(moves, axis=0)]))
            tracks.append(np.mean(per_side, axis=0))
        return tracks


def _describe(region: _Region, track: np.ndarray, eyes: float, threshold: float, n: int) -> tuple[float, str] | None:
    magnitude = np.linalg.norm(track, axis=1)
    apex = int(magnitude.argmax())
    out, up = track[apex]
    share = float(magnitude[apex]) / max(eyes, 1e-6)
    if share < threshold:
        return None
    vertical = "up" if up > 0 else "down"
    horizontal = "out" if out > 0 else "in"
    # A vertical word when the movement is mostly vertical (or the region has no sideways word): AU12 pulls the
    # lip corners both up and out, and is still AU12.
    direction = vertical if abs(up) >= 0.6 * abs(out) or horizontal not in region.words else horizontal
    if direction not in region.words:
        return None
    movement, au = region.words[direction]
    strength = "slightly" if share < 2 * threshold else "clearly" if share < 4 * threshold else "strongly"
    active = np.flatnonzero(magnitude >= 0.3 * magnitude[apex])
    onset, offset = int(active[0]), int(active[-1])
    if offset >= n - 1:
        timing = f"from frame {onset + 1}, peaking at frame {apex + 1} and held to the end"
    else:
        timing = f"from frame {onset + 1}, peaking at frame {apex + 1}, easing by frame {offset + 2}"
    if direction == "down" and region.name == "upper lids" and offset - onset <= 3 and offset < n - 1:
        return share, f"the eyes blink {strength} around frame {apex + 1}"
    return share, f"{movement} {strength} ({au}), {timing}"
