"""From per-frame detections to aligned face crops: fill missed frames, smooth over time, rotate/scale/crop, JPEG."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .face_common import MEAN_SHAPE, FaceBackend, NoFaceError, check_frames, eye_centres, mouth_centre
from .face_track import fill_gaps, smooth_over_time

NO_FACE_POLICIES = ("fail", "center_crop")


@dataclass
class AlignedClip:
    crops: list[bytes]        # JPEG, size x size, one per frame
    landmarks: np.ndarray     # (N, 68, 2) float32 in crop pixels
    boxes: np.ndarray         # (N, 4) float32 x0, y0, x1, y1 in source pixels, filled in and smoothed
    detected: np.ndarray      # (N,) bool: the detector found the face in that frame (else filled in)
    backend: str              # "fan" | "dlib" | "haar" | "center_crop"
    landmark_source: str      # "fan" | "dlib" | "template"
    transforms: np.ndarray    # (N, 2, 3) float32 affine maps from source pixels to crop pixels


# Crop geometry in mean-shape units. The crop is centred halfway between the eyes' midpoint and the mouth, and
# its side is the face height (brows to chin) plus `margin` of it on each side: the whole face, some hair and chin.
_TEMPLATE_LEFT_EYE, _TEMPLATE_RIGHT_EYE = eye_centres(MEAN_SHAPE)
_TEMPLATE_EYES = (_TEMPLATE_LEFT_EYE + _TEMPLATE_RIGHT_EYE) / 2
_TEMPLATE_MOUTH = mouth_centre(MEAN_SHAPE)
_TEMPLATE_EYE_DISTANCE = float(np.linalg.norm(_TEMPLATE_RIGHT_EYE - _TEMPLATE_LEFT_EYE))
_TEMPLATE_EYES_TO_MOUTH = float(np.linalg.norm(_TEMPLATE_MOUTH - _TEMPLATE_EYES))
_TEMPLATE_CENTRE = (_TEMPLATE_EYES + _TEMPLATE_MOUTH) / 2
_TEMPLATE_FACE_HEIGHT = float(np.ptp(MEAN_SHAPE[:, 1]))
# Detector boxes span about one mean-shape unit (Haar a little more, S3FD a little less). Landmarks whose scale
# is more than twice off the box's are a failed fit, and the box alone places the crop.
_LANDMARK_BOX_AGREEMENT = 2.0


def align_clip(frames: np.ndarray, backend: FaceBackend, *, size: int = 224, margin: float = 0.25, smooth: int = 5,
               no_face: str = "fail", jpeg_quality: int = 90) -> AlignedClip:
    """Detect, track, smooth and align the face of a clip into `size` x `size` JPEG crops.

    `frames` is (N, H, W, 3) uint8 RGB. Frames where the backend found no face get the box and landmarks
    interpolated from their neighbours (`detected` False). Boxes and landmarks are smoothed with a moving average
    of `smooth` frames so the crops do not jitter (1 = no smoothing). The crop holds the face (brows to chin)
    plus `margin` of its height on every side. With no face in any frame: NoFaceError (`no_face="fail"`), or a
    centre crop of each frame (`no_face="center_crop"`, backend "center_crop", the mean shape as landmarks).
    """
    frames = check_frames(frames)
    _check_options(size, margin, smooth, no_face, jpeg_quality)
    detections = backend.detect(frames)
    if len(detections) != len(frames):
        raise RuntimeError(f"face backend {backend.name!r} gave {len(detections)} results for {len(frames)} frames")
    detected = np.array([detection is not None for detection in detections])
    if not detected.any():
        if no_face == "fail":
            raise NoFaceError(f"no face detected in any of the {len(frames)} sampled frames")
        return _centre_crop_clip(frames, size, margin, jpeg_quality)

    boxes = np.zeros((len(frames), 4), np.float32)
    landmarks = np.zeros((len(frames), *MEAN_SHAPE.shape), np.float32)
    for index, detection in enumerate(detections):
        if detection is not None:
            boxes[index], landmarks[index] = detection.box, detection.landmarks
    boxes = smooth_over_time(fill_gaps(boxes, detected), smooth)
    landmarks = smooth_over_time(fill_gaps(landmarks, detected), smooth)
    transforms = alignment_transforms(landmarks, boxes, size, margin)
    crops = [_encode_jpeg(_warp(frame, transform, size), jpeg_quality) for frame, transform in zip(frames, transforms)]
    return AlignedClip(crops=crops, landmarks=map_points(transforms, landmarks), boxes=boxes, detected=detected,
                       backend=backend.name, landmark_source=backend.landmark_source, transforms=transforms)


def alignment_transforms(landmarks: np.ndarray, boxes: np.ndarray, size: int, margin: float) -> np.ndarray:
    """Similarity transforms (N, 2, 3) from source pixels to the aligned crop, from landmarks (N, 68, 2) and boxes.

    Rotation levels the eye line; scale comes from the face size; the point halfway between the eyes and the mouth
    goes to the crop centre.
    """
    left_eye, right_eye = eye_centres(landmarks)
    eyes, mouth = (left_eye + right_eye) / 2, mouth_centre(landmarks)
    eye_line = right_eye - left_eye
    angle = np.arctan2(eye_line[:, 1], eye_line[:, 0])
    centre = (eyes + mouth) / 2
    # Turning the head shortens the eye distance, nodding shortens eyes-to-mouth; neither ever lengthens: the
    # larger estimate is the face's scale (source pixels per mean-shape unit).
    scale = np.maximum(np.linalg.norm(eye_line, axis=1) / _TEMPLATE_EYE_DISTANCE,
                       np.linalg.norm(mouth - eyes, axis=1) / _TEMPLATE_EYES_TO_MOUTH)

    box_size = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 1, None) * np.clip(boxes[:, 3] - boxes[:, 1], 1, None))
    trusted = np.isfinite(scale) & np.isfinite(centre).all(axis=1) & np.isfinite(angle)
    trusted &= (scale < box_size * _LANDMARK_BOX_AGREEMENT) & (scale > box_size / _LANDMARK_BOX_AGREEMENT)
    angle = np.where(trusted, angle, 0.0)
    scale = np.where(trusted, scale, box_size)
    centre = np.where(trusted[:, None], centre, (boxes[:, :2] + boxes[:, 2:]) / 2)

    zoom = size / (scale * _TEMPLATE_FACE_HEIGHT * (1 + 2 * margin))
    cos, sin = zoom * np.cos(angle), zoom * np.sin(angle)
    linear = np.stack([np.stack([cos, sin], axis=1), np.stack([-sin, cos], axis=1)], axis=1)
    shift = (size - 1) / 2 - np.einsum("nij,nj->ni", linear, centre)
    return np.concatenate([linear, shift[:, :, None]], axis=2).astype(np.float32)


def map_points(transforms: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N, K, 2) mapped through affine transforms (N, 2, 3)."""
    return (np.einsum("nij,nkj->nki", transforms[:, :, :2], points) + transforms[:, None, :, 2]).astype(np.float32)


def canonical_landmarks(size: int, margin: float) -> np.ndarray:
    """The mean shape (68, 2) as it lies in a `size` x `size` crop, aligned as a detected face would be."""
    unit_box = np.array([[0, 0, 1, 1]], np.float32)  # the mean shape's own scale: one unit
    transform = alignment_transforms(MEAN_SHAPE[None], unit_box, size, margin)
    return map_points(transform, MEAN_SHAPE[None])[0]


def _centre_crop_clip(frames: np.ndarray, size: int, margin: float, jpeg_quality: int) -> AlignedClip:
    count, height, width = frames.shape[:3]
    side = min(height, width)
    zoom = size / side
    transform = np.array([[zoom, 0, (size - 1) / 2 - zoom * (width - 1) / 2],
                          [0, zoom, (size - 1) / 2 - zoom * (height - 1) / 2]], np.float32)
    box = np.array([(width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2], np.float32)
    return AlignedClip(crops=[_encode_jpeg(_warp(frame, transform, size), jpeg_quality) for frame in frames],
                       landmarks=np.repeat(canonical_landmarks(size, margin)[None], count, axis=0),
                       boxes=np.repeat(box[None], count, axis=0), detected=np.zeros(count, bool),
                       backend="center_crop", landmark_source="template",
                       transforms=np.repeat(transform[None], count, axis=0))


def _warp(frame: np.ndarray, transform: np.ndarray, size: int) -> np.ndarray:
    zoom = float(np.sqrt(abs(np.linalg.det(transform[:, :2]))))
    if zoom < 0.5:
        # Bilinear sampling that shrinks more than 2x aliases: area-average the frame down first, then warp.
        height, width = frame.shape[:2]
        shrunk = cv2.resize(frame, (max(1, round(width * zoom)), max(1, round(height * zoom))),
                            interpolation=cv2.INTER_AREA)
        factors = np.array([shrunk.shape[1] / width, shrunk.shape[0] / height])
        # cv2.resize maps source x to (x + 0.5) * factor - 0.5; undo that inside the transform.
        linear = transform[:, :2] / factors
        transform = np.concatenate([linear, (transform[:, 2] + linear @ (0.5 - 0.5 * factors))[:, None]], axis=1)
        frame = shrunk
    return cv2.warpAffine(frame, transform, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode a face crop as JPEG")
    return encoded.tobytes()


def _check_options(size: int, margin: float, smooth: int, no_face: str, jpeg_quality: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer of at least 16 pixels, got {size!r}")
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a non-negative number, got {margin!r}")
    if not isinstance(smooth, (int, np.integer)) or smooth < 1:
        raise ValueError(f"smooth must be a whole number of frames >= 1, got {smooth!r}")
    if no_face not in NO_FACE_POLICIES:
        raise ValueError(f"no_face must be one of {NO_FACE_POLICIES}, got {no_face!r}")
    if not isinstance(jpeg_quality, (int, np.integer)) or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be an integer from 1 to 100, got {jpeg_quality!r}")
