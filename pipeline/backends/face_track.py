"""Temporal side of face processing: follow one face through a clip, fill frames where it was missed, smooth."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .face_common import Detection

Candidates = tuple[np.ndarray, np.ndarray]   # (K, 4) x0, y0, x1, y1 boxes in source pixels and their (K,) scores

# Anywhere in a clip, a box within this many face sizes of another (and of similar size) may be the same face.
_SAME_FACE_IN_CLIP = 2.0
# A face seen in at least this share of the frames of the most persistent one is a real face, not a flicker.
_PERSISTENT = 0.5


def scan_sparsely(frames: np.ndarray, scan_every: int, find_faces: Callable[[np.ndarray], Candidates],
                  find_near: Callable[[np.ndarray, np.ndarray], Candidates]) -> list[Candidates]:
    """Face candidates per frame: a full scan (`find_faces(frame)`) of every `scan_every`-th frame and the last,
    a search near the faces of the neighbouring scanned frames elsewhere (`find_near(frame, guide_boxes)`), and a
    full scan wherever that finds nothing. A face moves little between sampled frames, and a search around a known
    face costs a few ms against tens of ms for a full scan."""
    n = len(frames)
    scanned = sorted(set(range(0, n, scan_every)) | {n - 1})
    found: list[Candidates | None] = [None] * n
    for i in scanned:
        found[i] = find_faces(frames[i])
    for i in range(n):
        if found[i] is not None:
            continue
        before = max(k for k in scanned if k < i)
        after = min(k for k in scanned if k > i)
        guides = merge_overlapping(np.concatenate([found[before][0], found[after][0]]))
        near = find_near(frames[i], guides) if len(guides) else None
        found[i] = near if near is not None and len(near[0]) else find_faces(frames[i])
    return found


def track_and_landmark(frames: np.ndarray, scan_every: int, find_faces: Callable[[np.ndarray], Candidates],
                       find_near: Callable[[np.ndarray, np.ndarray], Candidates],
                       landmarks: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> list[Detection | None]:
    """A box-then-landmarks backend's `detect`: candidates by `scan_sparsely`, the face followed by
    `select_track`, and `landmarks(frame, box)` (68, 2) of the tracked face in each frame where it was found."""
    found = scan_sparsely(frames, scan_every, find_faces, find_near)
    picks = select_track([boxes for boxes, _ in found], [scores for _, scores in found],
                         (frames.shape[2], frames.shape[1]))
    return [None if pick is None else
            Detection(box=boxes[pick], landmarks=landmarks(frame, boxes[pick]), score=float(scores[pick]))
            for frame, (boxes, scores), pick in zip(frames, found, picks)]


def merge_overlapping(boxes: np.ndarray) -> np.ndarray:
    """One box per face: boxes that overlap (the same face in the frames before and after) become their mean."""
    merged: list[list[np.ndarray]] = []
    for box in boxes:
        for group in merged:
            if _iou(group[0], box) > 0.3:
                group.append(box)
                break
        else:
            merged.append([box])
    return np.array([np.mean(group, axis=0) for group in merged], np.float32).reshape(-1, 4)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def select_track(candidates: list[np.ndarray], scores: list[np.ndarray], frame_size: tuple[int, int], *,
                 max_jump: float = 1.0) -> list[int | None]:
    """For each frame, the index of the candidate box that continues the face track, or None.

    `candidates` holds one (K, 4) array of x0, y0, x1, y1 boxes per frame (K may be 0), `scores` the (K,) detector
    confidences, and `frame_size` is (width, height). The track starts at the most prominent (large, central,
    confident) of the faces that persist through the clip: a false detection flickers, a face stays. From there
    it follows, frame by frame, forwards and backwards, the nearest box. A box whose centre moved more than
    `max_jump` face sizes from the last one kept, or whose size changed more than twofold, is another face or a
    false detection, and leaves that frame empty (to be filled in from its neighbours).
    """
    anchor = _anchor(candidates, scores, frame_size)
    picks: list[int | None] = [None] * len(candidates)
    if anchor is None:
        return picks
    anchor_frame, anchor_index = anchor
    picks[anchor_frame] = anchor_index
    anchor_box = candidates[anchor_frame][anchor_index]
    for frames in (range(anchor_frame + 1, len(candidates)), range(anchor_frame - 1, -1, -1)):
        reference = anchor_box
        for frame in frames:
            index = _continuation(candidates[frame], reference, max_jump)
            if index is not None:
                picks[frame] = index
                reference = candidates[frame][index]
    return picks


def _anchor(candidates: list[np.ndarray], scores: list[np.ndarray],
            frame_size: tuple[int, int]) -> tuple[int, int] | None:
    width, height = frame_size
    half_diagonal = 0.5 * np.hypot(width, height)
    found = []  # (frames the face is seen in, prominence, frame, index)
    for frame, (boxes, confidences) in enumerate(zip(candidates, scores)):
        if len(boxes) == 0:
            continue
        centres = 0.5 * (boxes[:, :2] + boxes[:, 2:])
        off_centre = np.clip(np.hypot(centres[:, 0] - width / 2, centres[:, 1] - height / 2) / half_diagonal, 0, 1)
        # A face at the border counts half as much as one of the same size in the middle.
        prominence = _areas(boxes) * (1.0 - 0.5 * off_centre) * confidences
        for index, box in enumerate(boxes):
            seen_in = sum(_continuation(others, box, _SAME_FACE_IN_CLIP) is not None for others in candidates)
            found.append((seen_in, prominence[index], frame, index))
    if not found:
        return None
    most_seen = max(entry[0] for entry in found)
    persistent = [entry for entry in found if entry[0] >= _PERSISTENT * most_seen]
    _, _, frame, index = max(persistent, key=lambda entry: entry[1])
    return frame, index


def _continuation(boxes: np.ndarray, reference: np.ndarray, max_jump: float) -> int | None:
    if len(boxes) == 0:
        return None
    reference_size = np.sqrt(_areas(reference[None])[0])
    sizes = np.sqrt(_areas(boxes))
    shift = np.hypot(*(0.5 * (boxes[:, :2] + boxes[:, 2:]) - 0.5 * (reference[:2] + reference[2:])).T)
    plausible = (shift <= max_jump * reference_size) & (sizes <= 2 * reference_size) & (sizes >= reference_size / 2)
    if not plausible.any():
        return None
    return int(np.argmin(np.where(plausible, shift, np.inf)))


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def fill_gaps(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Rows of `values` (N, ...) where `present` is False, interpolated linearly from the nearest present rows
    before and after (held constant past the first and last). Needs at least one present row."""
    count = len(values)
    known = np.flatnonzero(present)
    if len(known) == 0:
        raise ValueError("fill_gaps needs at least one present row")
    flat = values.reshape(count, -1).astype(np.float64)
    steps = np.arange(count)
    before = known[np.clip(np.searchsorted(known, steps, side="right") - 1, 0, len(known) - 1)]
    after = known[np.clip(np.searchsorted(known, steps, side="left"), 0, len(known) - 1)]
    span = after - before
    weight = np.divide(steps - before, span, out=np.zeros(count), where=span > 0)[:, None]
    filled = flat[before] * (1.0 - weight) + flat[after] * weight
    return filled.reshape(values.shape).astype(values.dtype)


def smooth_over_time(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of `values` (N, ...) along the first axis over `window` frames (odd; an even window
    is widened by one). Near the ends the window shrinks symmetrically, so steady motion is kept without lag."""
    count = len(values)
    half = window // 2
    if half == 0 or count < 3:
        return values.copy()
    flat = values.reshape(count, -1).astype(np.float64)
    running = np.concatenate([np.zeros((1, flat.shape[1])), np.cumsum(flat, axis=0)])
    steps = np.arange(count)
    reach = np.minimum(half, np.minimum(steps, count - 1 - steps))
    start, stop = steps - reach, steps + reach + 1
    averaged = (running[stop] - running[start]) / (stop - start)[:, None]
    return averaged.reshape(values.shape).astype(values.dtype)
