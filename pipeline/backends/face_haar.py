"""Offline face backend: OpenCV Haar cascades find the face and its eyes; the mean face shape is fitted to them.

The landmarks are an estimate (landmark_source "template"): the mean shape placed by the eyes when both are found,
else by the face box. Good enough to align crops; not a landmark detector.
"""
from __future__ import annotations

import cv2
import numpy as np

from .face_common import MEAN_SHAPE, Detection, check_frames, downscale, eye_centres, shape_through_eyes
from .face_track import track_and_landmark

FACE_CASCADE = "haarcascade_frontalface_default.xml"
EYE_CASCADE = "haarcascade_eye.xml"

# Where the mean shape sits in an OpenCV frontal-face box: box-relative point = scale * mean shape + offset.
# Measured on the astronaut photo (eyes at 0.27 and 0.72 of the box width, 0.38 of its height), which matches the
# usual geometry of this cascade's boxes.
_SHAPE_IN_BOX_SCALE = 1.15
_SHAPE_IN_BOX_OFFSET = np.array([-0.10, 0.01], dtype=np.float32)

# The eye search runs on the upper part of the face box, resized to a fixed width: eyes come out ~30 px, above
# the eye cascade's 20 px window, and the scan stays cheap (a few ms).
_EYE_REGION_HEIGHT = 0.6
_EYE_SEARCH_WIDTH = 96
# An eye pair is believed only if each eye is near where the box puts it and their distance is plausible.
_EYE_MAX_OFFSET = 0.2          # in face-box widths
_EYE_DISTANCE_RANGE = (0.6, 1.5)  # relative to the distance the box predicts
# Between full-frame scans, a frame is searched only around the faces its neighbouring scanned frames hold, for
# faces of about the same size: a face moves little between sampled frames, and this search costs a few ms
# against tens of ms for a full scan.
_NEAR_MARGIN = 0.25            # search region = face box grown by this share of its size on each side
_NEAR_SIZE_RANGE = (0.75, 1.33)  # face sizes searched, relative to the neighbouring face


class HaarBackend:
    """Haar cascade face backend; needs no weights and no torch. Not thread-safe: keep one per thread."""

    name = "haar"
    landmark_source = "template"

    def __init__(self, *, detect_max_side: int = 320, scale_factor: float = 1.1, min_neighbors: int = 4,
                 min_face: float = 0.15, scan_every: int = 8):
        if detect_max_side < 48:
            raise ValueError(f"detect_max_side must be at least 48 pixels, got {detect_max_side}")
        if scale_factor <= 1.0:
            raise ValueError(f"scale_factor must be above 1, got {scale_factor}")
        if min_neighbors < 0:
            raise ValueError(f"min_neighbors must not be negative, got {min_neighbors}")
        if not 0 <= min_face < 1:
            raise ValueError(f"min_face is a share of the frame's shorter side, in [0, 1); got {min_face}")
        if scan_every < 1:
            raise ValueError(f"scan_every must be at least 1, got {scan_every}")
        self.min_face = min_face
        self.scan_every = scan_every
        self.detect_max_side = detect_max_side
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self._face_cascade = _load_cascade(FACE_CASCADE)
        self._eye_cascade = _load_cascade(EYE_CASCADE)

    @property
    def identity(self) -> dict:
        """What decides this backend's output, for cache keys."""
        return {"backend": self.name, "opencv": cv2.__version__, "cascades": [FACE_CASCADE, EYE_CASCADE],
                "detect_max_side": self.detect_max_side, "scale_factor": self.scale_factor,
                "min_neighbors": self.min_neighbors, "min_face": self.min_face, "scan_every": self.scan_every}

    def detect(self, frames: np.ndarray) -> list[Detection | None]:
        frames = check_frames(frames)
        return track_and_landmark(frames, self.scan_every, self.find_faces, self._find_near, self.fit_shape)

    def find_faces(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All face boxes (K, 4) x0, y0, x1, y1 in source pixels, and their scores (the cascade's neighbour counts)."""
        small, factor = downscale(frame, self.detect_max_side)
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        smallest = round(self.min_face * min(gray.shape))
        # Faces smaller than min_face are not searched: the smallest scales are the costliest part of a scan.
        boxes, neighbours = self._face_cascade.detectMultiScale2(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(smallest, smallest))
        return _boxes(boxes, neighbours, factor, (0.0, 0.0))

    def _find_near(self, frame: np.ndarray, guides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Faces of about the size of each guide box, searched in a region around it."""
        all_boxes, all_scores = [], []
        for box in guides:
            size = float(max(box[2] - box[0], box[3] - box[1]))
            pad = _NEAR_MARGIN * size
            x0, y0 = max(0, int(box[0] - pad)), max(0, int(box[1] - pad))
            x1, y1 = min(frame.shape[1], int(box[2] + pad)), min(frame.shape[0], int(box[3] + pad))
            # The same scale as a full scan of this frame, so the cascade sees the face as it would there.
            factor = min(1.0, self.detect_max_side / max(frame.shape[:2]))
            region = frame[y0:y1, x0:x1]
            if factor < 1.0:
                region = cv2.resize(region, (max(1, round((x1 - x0) * factor)), max(1, round((y1 - y0) * factor))),
                                    interpolation=cv2.INTER_AREA)
            gray = cv2.equalizeHist(cv2.cvtColor(region, cv2.COLOR_RGB2GRAY))
            low, high = (round(r * size * factor) for r in _NEAR_SIZE_RANGE)
            boxes, neighbours = self._face_cascade.detectMultiScale2(
                gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(low, low),
                maxSize=(high, high))
            boxes, scores = _boxes(boxes, neighbours, factor, (x0, y0))
            all_boxes.append(boxes)
            all_scores.append(scores)
        return np.concatenate(all_boxes), np.concatenate(all_scores)

    def fit_shape(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The mean shape (68, 2) placed through the eyes found in the box, or by the box alone."""
        eyes = self._find_eyes(frame, box)
        return shape_through_eyes(*eyes) if eyes is not None else shape_in_box(box)

    def _find_eyes(self, frame: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        box_width, box_height = box[2] - box[0], box[3] - box[1]
        x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
        x1 = min(int(np.ceil(box[2])), frame.shape[1])
        y1 = min(int(np.ceil(box[1] + _EYE_REGION_HEIGHT * box_height)), frame.shape[0])
        if x1 - x0 < 16 or y1 - y0 < 8:
            return None
        factor = _EYE_SEARCH_WIDTH / (x1 - x0)
        region = cv2.resize(frame[y0:y1, x0:x1], (_EYE_SEARCH_WIDTH, max(1, round((y1 - y0) * factor))),
                            interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        gray = cv2.equalizeHist(cv2.cvtColor(region, cv2.COLOR_RGB2GRAY))
        smallest, largest = round(0.15 * _EYE_SEARCH_WIDTH), round(0.4 * _EYE_SEARCH_WIDTH)
        eyes, _ = self._eye_cascade.detectMultiScale2(gray, scaleFactor=1.15, minNeighbors=3,
                                                      minSize=(smallest, smallest), maxSize=(largest, largest))
        if len(eyes) < 2:
            return None
        eyes = np.asarray(eyes, np.float32)
        centres = (eyes[:, :2] + eyes[:, 2:] / 2) / factor + np.array([x0, y0], np.float32)
        expected_left, expected_right = eye_centres(shape_in_box(box))
        left_index = _nearest(centres, expected_left, box_width)
        right_index = _nearest(centres, expected_right, box_width)
        if left_index is None or right_index is None or left_index == right_index:
            return None
        left, right = centres[left_index], centres[right_index]
        distance = np.hypot(*(right - left)) / np.hypot(*(expected_right - expected_left))
        if not _EYE_DISTANCE_RANGE[0] <= distance <= _EYE_DISTANCE_RANGE[1]:
            return None
        return left, right


def _boxes(boxes, neighbours, factor: float, offset: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's (x, y, w, h) boxes found at `factor` scale in a region at `offset` -> source x0, y0, x1, y1."""
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    boxes = np.asarray(boxes, np.float32)
    boxes[:, 2:] += boxes[:, :2]
    boxes = boxes / factor + np.array([*offset, *offset], np.float32)
    return boxes, np.asarray(neighbours, np.float32).reshape(-1)


def _nearest(points: np.ndarray, target: np.ndarray, box_width: float) -> int | None:
    distances = np.hypot(*(points - target).T)
    index = int(np.argmin(distances))
    return index if distances[index] <= _EYE_MAX_OFFSET * box_width else None


def shape_in_box(box: np.ndarray) -> np.ndarray:
    """The mean shape (68, 2) placed in a Haar face box, upright."""
    origin, size = box[:2], box[2:] - box[:2]
    return (origin + size * (_SHAPE_IN_BOX_SCALE * MEAN_SHAPE + _SHAPE_IN_BOX_OFFSET)).astype(np.float32)


def _load_cascade(file_name: str) -> cv2.CascadeClassifier:
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if folder is None:
        raise RuntimeError("this OpenCV build ships no Haar cascades (cv2.data.haarcascades); "
                           "install opencv-python 4.x (OpenCV 5 dropped them)")
    cascade = cv2.CascadeClassifier(folder + file_name)
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load the Haar cascade {folder + file_name}")
    return cascade
