"""FAN 68-point landmarks from the face-alignment package, on S3FD boxes or (much cheaper on CPU) on Haar boxes.

face-alignment loads its weights from the torch hub cache ($TORCH_HOME/hub/checkpoints), downloading them there
on first use; both it and torch are imported only when this backend is built.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .face_common import Detection, check_frames, downscale
from .face_haar import HaarBackend
from .face_track import select_track

# The file names face-alignment gives its downloads (the last part of its model URLs).
FAN_WEIGHTS_FILE = "2DFAN4-11f355bf06.pth.tar"   # face_alignment.api.models_urls["2DFAN-4"]
S3FD_WEIGHTS_FILE = "s3fd-619a316812.pth"        # face_alignment.detection.sfd.sfd_detector.models_urls["s3fd"]

DETECTORS = ("sfd", "haar")
DEVICE_TYPES = ("cpu", "cuda", "mps")  # the ones face-alignment accepts
_DEFAULT_DETECT_MAX_SIDE = {"sfd": 640, "haar": 320}
# S3FD is VGG-16 at full detection resolution: 4 frames of 640x480 already take ~1 GB of activations.
_S3FD_FRAMES_PER_BATCH = 4
# FAN sees 256x256 crops: on a GPU a clip's 16 sampled frames go through in one pass. On a CPU one frame a pass is
# faster (measured, FAN-4 on one core: a batch of 8 took 1.3x as long as 8 single frames), as face-alignment does.
_FAN_FRAMES_PER_BATCH = 16


def hub_checkpoints(torch_home: Path | None = None) -> Path:
    """The folder torch hub (and so face-alignment) keeps downloaded weights in."""
    if torch_home is not None:
        return Path(torch_home) / "hub" / "checkpoints"
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def fan_weights_present(torch_home: Path | None = None) -> bool:
    """Whether the 2D FAN weights are in the torch hub cache (of `torch_home`, else torch's own)."""
    return (hub_checkpoints(torch_home) / FAN_WEIGHTS_FILE).is_file()


def s3fd_weights_present(torch_home: Path | None = None) -> bool:
    return (hub_checkpoints(torch_home) / S3FD_WEIGHTS_FILE).is_file()


def face_alignment_installed() -> bool:
    return importlib.util.find_spec("face_alignment") is not None


def import_face_alignment():
    try:
        import face_alignment
    except ImportError as error:
        raise ImportError("the 'fan' face backend needs the face-alignment package: "
                          "pip install 'affectprep[face]'") from error
    return face_alignment


class FanBackend:
    """FAN landmarks (face-alignment, 2D, compile=False) on the tracked face of each frame."""

    name = "fan"
    landmark_source = "fan"

    def __init__(self, *, device: str = "cpu", detector: str = "sfd", flip_input: bool = True,
                 detect_max_side: int | None = None):
        if detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
        if device.split(":")[0] not in DEVICE_TYPES:
            raise ValueError(f"device must be one of {DEVICE_TYPES} (optionally with ':index'), got {device!r}")
        face_alignment = import_face_alignment()
        self.detector = detector
        self.flip_input = flip_input
        self._version = face_alignment.__version__
        self.frames_per_batch = 1 if device.split(":")[0] == "cpu" else _FAN_FRAMES_PER_BATCH
        self.detect_max_side = detect_max_side or _DEFAULT_DETECT_MAX_SIDE[detector]
        self._haar = HaarBackend(detect_max_side=self.detect_max_side) if detector == "haar" else None
        # With Haar boxes, face-alignment's "folder" detector stands in for S3FD: it loads no weights, and boxes
        # reach FAN through `detected_faces=`, the package's own way to pass boxes found elsewhere.
        self._aligner = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D, device=device, flip_input=flip_input, compile=False,
            face_detector="folder" if detector == "haar" else "sfd")

    @property
    def identity(self) -> dict:
        """What decides this backend's output, for cache keys (the weight file names carry their hash prefixes)."""
        return {"backend": self.name, "face_alignment": self._version, "weights": FAN_WEIGHTS_FILE,
                "detector": self._haar.identity if self._haar is not None else S3FD_WEIGHTS_FILE,
                "detect_max_side": self.detect_max_side, "flip_input": self.flip_input}

    def detect(self, frames: np.ndarray) -> list[Detection | None]:
        frames = check_frames(frames)
        faces = self._haar_faces(frames) if self._haar is not None else self._s3fd_faces(frames)
        present = [i for i, face in enumerate(faces) if face is not None]
        landmarks = self.landmarks(frames[present], [faces[i][1] for i in present]) if present else []
        detections: list[Detection | None] = [None] * len(frames)
        for i, points in zip(present, landmarks):
            box, _, score = faces[i]
            detections[i] = Detection(box=box, landmarks=points, score=score)
        return detections

    def landmarks(self, images: np.ndarray, fan_boxes: list[np.ndarray]) -> list[np.ndarray]:
        """FAN's 68 landmarks (68, 2) for one face box per image, the face crops of many frames in one forward
        pass on a GPU (`frames_per_batch`). face-alignment batches only the faces of one image
        (`get_landmarks_from_batch` loops over images); here its own crop, flip and heatmap decoding run around a
        network call over many frames."""
        import torch
        from face_alignment.utils import CENTER_Y_OFFSET, crop, flip, get_preds_fromhm

        aligner = self._aligner
        reference = aligner.face_detector.reference_scale
        centres, scales, crops = [], [], []
        for image, box in zip(images, fan_boxes):
            x0, y0, x1, y1 = (float(v) for v in box)
            centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2 - (y1 - y0) * CENTER_Y_OFFSET])
            scale = (x1 - x0 + y1 - y0) / reference
            centres.append(centre)
            scales.append(scale)
            crops.append(crop(image, centre, scale).transpose(2, 0, 1).astype(np.float32) / 255.0)
        batch = torch.from_numpy(np.stack(crops))
        heatmaps = []
        with torch.no_grad():
            for start in range(0, len(batch), self.frames_per_batch):
                chunk = batch[start:start + self.frames_per_batch].to(aligner.device, dtype=aligner.dtype)
                heat = _last(aligner.face_alignment_net(chunk))
                if self.flip_input:
                    heat = heat + flip(_last(aligner.face_alignment_net(flip(chunk))), is_label=True)
                heatmaps.append(heat.to(device="cpu", dtype=torch.float32))
        heat = torch.cat(heatmaps).numpy()
        return [np.asarray(get_preds_fromhm(heat[i:i + 1], centre, scale)[1], np.float32).reshape(-1, 2)
                for i, (centre, scale) in enumerate(zip(centres, scales))]

    def _haar_faces(self, frames: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float] | None]:
        # FAN's crop expects a box around the landmarks (as S3FD gives), not Haar's box: the extent of the mean
        # shape fitted to the Haar box and eyes is that box.
        return [None if found is None else
                (found.box, np.concatenate([found.landmarks.min(axis=0), found.landmarks.max(axis=0)]), found.score)
                for found in self._haar.detect(frames)]

    def _s3fd_faces(self, frames: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float] | None]:
        import torch

        shrunk = [downscale(frame, self.detect_max_side) for frame in frames]
        factor = shrunk[0][1]
        images = torch.from_numpy(np.stack([image for image, _ in shrunk])).permute(0, 3, 1, 2)
        found: list[np.ndarray] = []  # per frame: (K, 5) x0, y0, x1, y1, score in detection pixels
        for start in range(0, len(images), _S3FD_FRAMES_PER_BATCH):
            batch = images[start:start + _S3FD_FRAMES_PER_BATCH]
            found += [np.asarray(boxes, np.float32).reshape(-1, 5)
                      for boxes in self._aligner.face_detector.detect_from_batch(batch)]
        picks = select_track([boxes[:, :4] / factor for boxes in found], [boxes[:, 4] for boxes in found],
                             (frames.shape[2], frames.shape[1]))
        faces: list[tuple[np.ndarray, np.ndarray, float] | None] = []
        for boxes, pick in zip(found, picks):
            if pick is None:
                faces.append(None)
            else:
                box = boxes[pick, :4] / factor
                faces.append((box, box, float(boxes[pick, 4])))
        return faces


def _last(output):
    """FAN returns the heatmaps of every hourglass stack in a list; the last is the prediction."""
    return output[-1] if isinstance(output, list) else output
