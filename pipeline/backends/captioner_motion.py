"""`motion`: an offline captioner with no weights that says where and when the aligned face moves, in FACS terms.

The demo uses it, and so does any run with no captioning model configured. Dense optical flow (Farneback) between
consecutive crops, minus the whole face's rigid motion, is averaged in regions placed by the 68 landmarks and summed
over time into each region's displacement from the first frame. A region that moves far enough gets a FACS phrase
("the inner brows raise (AU1)"), an intensity word and its onset, apex and offset frames; a short down-and-back
movement of the upper lids is a blink. The landmarks may be a mean-shape estimate that never moves (Haar backend),
so motion is always read from the images, and the landmarks only say where the regions lie.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from affectprep import schema

VERSION = 1   # bump when what is measured or how it is worded changes: it keys the caption cache
DETAILS = ("full", "brief")   # brief: the movements and their intensity, without the timing

# The face is measured at this scale (eye distance, pixels): fine enough for facial motion, small enough that 15
# flow fields stay cheap. Around the landmarks' box, this share of the eye distance is kept.
_EYE_PIXELS = 24
_FACE_MARGIN = 0.25
# Farneback: pyramid scale, levels, window, iterations, polynomial neighbourhood and its sigma, flags.
_FLOW_OPTIONS = (0.5, 2, 7, 1, 5, 1.1, 0)
# Each region is a Gaussian-weighted patch around its centre, this wide (sigma, in eye distances).
_PATCH_SIGMA = 0.15
# The rigid motion is fitted mostly where the face is at least this far (eye distances) from any region's centre.
_RIGID_CLEARANCE = 0.3
_RIGID_STRIDE = 3
_RIDGE = 1e-9 * np.eye(4)   # keeps the rigid fit solvable when no point is trusted
# A step whose rigid motion moves some point of the face further than this (pixels, at the scale above) is measured
# again after undoing it: Farneback's small windows lose track of larger motions.
_LARGE_STEP = 1.5
# A blink: the upper lids go down and are back up within this many frames on either side.
_BLINK_FRAMES = 3
_BLINK_EDGE = 0.3   # frames of a blink have the lids down at least this share of the threshold
_BLINK_BROWS = 1.5  # and at its deepest, the lids dip this many times further than the brows
# A movement starts where it reaches the first share of its largest displacement, peaks where it reaches the second,
# and eases where it falls below the third.
_ONSET_SHARE, _APEX_SHARE, _OFFSET_SHARE = 0.2, 0.9, 0.5
# Movements whose onset and apex lie within this many frames of each other are told in one sentence.
_SAME_TIME = 2


@dataclass(frozen=True)
class _Region:
    points: tuple[tuple[int, ...], ...]      # per side (one for a midline region): landmarks whose mean is the centre
    moves: dict[str, tuple[str, str, str]]   # direction -> (FACS action unit, what moves, how)


# Directions: "up"/"down" in the aligned crop, "out"/"in" away from / towards the face's vertical midline (only for
# regions with two sides: a midline region moving sideways is the head, not the face), "down-in" etc. for diagonal
# movements; a diagonal with no entry of its own takes its larger component's.
_REGIONS = (
    _Region(((20, 21), (22, 23)), {"up": ("AU1", "the inner brows", "raise"),
                                   "down": ("AU4", "the brows", "lower"),
                                   "in": ("AU4", "the brows", "draw together"),
                                   "down-in": ("AU4", "the brows", "lower and draw together")}),
    _Region(((17, 18), (25, 26)), {"up": ("AU2", "the outer brows", "raise"),
                                   "down": ("AU4", "the brows", "lower")}),
    _Region(((37, 38), (43, 44)), {"up": ("AU5", "the upper lids", "raise"),
                                   "down": ("AU41", "the upper lids", "droop")}),
    _Region(((40, 41), (46, 47)), {"up": ("AU7", "the lower lids", "tighten and rise")}),
    _Region(((41, 48), (46, 54)), {"up": ("AU6", "the cheeks", "raise")}),
    _Region(((29, 31), (29, 35)), {"up": ("AU9", "the nose", "wrinkles, its sides pulling up")}),
    _Region(((33, 51),), {"up": ("AU10", "the upper lip", "raises")}),
    _Region(((48,), (54,)), {"up": ("AU12", "the lip corners", "pull up"),
                             "up-out": ("AU12", "the lip corners", "pull up and outward"),
                             "down": ("AU15", "the lip corners", "pull down"),
                             "out": ("AU20", "the lips", "stretch sideways"),
                             "in": ("AU23", "the lips", "tighten and narrow")}),
    _Region(((57, 66),), {"down": ("AU25", "the lips", "part"),
                          "up": ("AU17", "the lower lip", "pushes up")}),
    _Region(((57, 8),), {"down": ("AU26", "the jaw", "drops"),
                         "up": ("AU17", "the chin", "raises")}),
)
_INNER_BROWS, _OUTER_BROWS, _UPPER_LIDS, _LOWER_LIDS = 0, 1, 2, 3   # their places in _REGIONS
_BLINKING = (_INNER_BROWS, _OUTER_BROWS, _UPPER_LIDS, _LOWER_LIDS)  # the regions a blink moves
# Lid movements that are these AUs only if the eyes open (+1) or close (-1) by the threshold at the apex: lids that
# move together with the brows or cheeks are carried along, not acting.
_EYE_OPENING = {"AU5": 1, "AU7": -1, "AU41": -1}
# Movements that a larger one nearby drags along: the cheek raiser lifts the lower lids and the nose sides, the nose
# wrinkler lifts the cheeks, the lip corner puller lifts the upper lip, an opening mouth pulls the lip corners down.
_DRAGGED_BY = {"AU7": ("AU6",), "AU9": ("AU6",), "AU6": ("AU9",), "AU10": ("AU12",), "AU15": ("AU25", "AU26")}


@dataclass(frozen=True)
class _Movement:
    """One region's movement over the clip (frames 0-based)."""

    au: str
    subject: str
    verb: str
    size: float            # largest displacement, in eye distances
    onset: int
    apex: int
    offset: int | None     # None: held to the end


class MotionCaptioner:
    """Describes the facial movement in a clip's aligned face crops. Deterministic; no weights, no torch."""

    name = "motion"

    def __init__(self, *, threshold: float = 0.03, detail: str = "full"):
        """threshold: the smallest movement described: a region's mean displacement from the first frame, as a
        share of the distance between the eyes (twice it is "clearly", four times "strongly").
        detail: "full" (movements, intensity and timing) or "brief" (movements and intensity only)."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) \
                or not np.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"threshold must be a positive share of the eye distance, got {threshold!r}")
        if detail not in DETAILS:
            raise ValueError(f"detail must be one of {DETAILS}, got {detail!r}")
        self.threshold = float(threshold)
        self.detail = detail

    @property
    def identity(self) -> dict:
        """What decides the captions, for cache keys (the flow comes from OpenCV, so its version counts too)."""
        return {"captioner": self.name, "version": VERSION, "threshold": self.threshold, "detail": self.detail,
                "opencv": cv2.__version__}

    def caption(self, crops: Sequence[bytes], landmarks: np.ndarray, frames_per_view: int) -> str:
        """Caption the first view of a clip: `crops` are JPEG face crops in temporal order, `landmarks` (N, 68, 2)
        (or (N, 136)) in crop pixels. Raises ValueError saying what is wrong with input it cannot use."""
        images, points = _first_view(crops, landmarks, frames_per_view)
        if len(images) == 1:
            return "A single frame: no movement can be seen."
        tracks = _region_tracks(*_face_frames(images, points))
        blinks = _blinks(tracks, self.threshold)
        # The blink's deepest frame names it; all of its frames are left out of the movements (it drags the brows).
        blink_frames = [run[int(np.argmin(tracks[run, _UPPER_LIDS, 1]))] for run in blinks]
        if blinks:
            tracks = _without_blinks(tracks, [frame for run in blinks for frame in run])
        return _write(_movements(tracks, self.threshold), blink_frames, len(images), self.threshold, self.detail)


def _first_view(crops: Sequence[bytes], landmarks, frames_per_view: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The first view's crops as grayscale images, and its landmarks' mean (68, 2) in crop pixels."""
    if isinstance(frames_per_view, bool) or not isinstance(frames_per_view, (int, np.integer)) or frames_per_view < 1:
        raise ValueError(f"frames_per_view must be a whole number of frames >= 1, got {frames_per_view!r}")
    crops = list(crops)
    if len(crops) < frames_per_view:
        raise ValueError(f"got {len(crops)} face crops, fewer than one view of {frames_per_view} frames")
    crops = crops[:frames_per_view]
    try:
        points = np.asarray(landmarks, np.float64).reshape(-1, schema.NUM_LANDMARKS, 2)
    except (TypeError, ValueError):
        raise ValueError(f"landmarks must hold {schema.NUM_LANDMARKS} (x, y) points per frame, got an array of "
                         f"shape {np.shape(landmarks)}") from None
    if len(points) < frames_per_view:
        raise ValueError(f"got landmarks for {len(points)} frames, fewer than one view of {frames_per_view} frames")
    points = points[:frames_per_view]
    if not np.isfinite(points).all():
        raise ValueError("the landmarks hold missing (NaN or infinite) coordinates")
    images = []
    for index, crop in enumerate(crops):
        image = None
        if isinstance(crop, (bytes, bytearray, memoryview)) and len(crop):
            image = cv2.imdecode(np.frombuffer(crop, np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ValueError(f"face crop {index} is not a readable JPEG image")
        if images and image.shape != images[0].shape:
            raise ValueError(f"face crop {index} is {image.shape[1]}x{image.shape[0]} pixels, unlike crop 0 "
                             f"({images[0].shape[1]}x{images[0].shape[0]})")
        images.append(image)
    # The landmarks only place the regions: their mean over the view is steadier than any one frame's.
    return images, points.mean(axis=0)


def _face_frames(images: list[np.ndarray], points: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The face cut out of every frame and scaled so the eyes lie _EYE_PIXELS apart, and the landmarks there.

    A fixed face scale keeps the flow's window the same share of the face for any crop size and margin, and the
    cut-out spares the flow the hair and background around the face."""
    scale = _EYE_PIXELS / _eye_distance(points)
    height, width = images[0].shape
    margin = _FACE_MARGIN * _EYE_PIXELS / scale
    x0, y0 = np.maximum(np.floor(points.min(axis=0) - margin), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(points.max(axis=0) + margin) + 1, (width, height)).astype(int)
    size = (round((x1 - x0) * scale), round((y1 - y0) * scale))
    if min(size) < 8:
        raise ValueError("the landmarks place the face (almost) outside the crop")
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    frames = [cv2.resize(image[y0:y1, x0:x1], size, interpolation=interpolation) for image in images]
    return frames, (points - (x0, y0)) * (size[0] / (x1 - x0), size[1] / (y1 - y0))


def _eye_distance(points: np.ndarray) -> float:
    distance = float(np.linalg.norm(points[36:42].mean(axis=0) - points[42:48].mean(axis=0)))
    if distance < 2:
        raise ValueError("the landmarks put both eyes in one place, so the face regions cannot be placed")
    return distance


def _region_tracks(frames: list[np.ndarray], points: np.ndarray) -> np.ndarray:
    """Each region's displacement from the first frame at every frame, (T, regions, 2) as (outward, up) in eye
    distances: the per-step flow in the region, less the face's rigid motion, summed over time."""
    height, width = frames[0].shape
    face = np.zeros((height, width), np.uint8)
    cv2.fillConvexPoly(face, cv2.convexHull(np.round(points).astype(np.int32)), 1)
    # The rigid fit samples every third pixel of the face: plenty for four parameters.
    ys, xs = np.nonzero(face[::_RIGID_STRIDE, ::_RIGID_STRIDE])
    ys, xs = ys * _RIGID_STRIDE, xs * _RIGID_STRIDE
    if len(xs) < 16:
        raise ValueError("the landmarks enclose almost none of the crop, so the face cannot be measured")
    frames = _same_brightness(frames, face.astype(bool))
    face_points = np.stack([xs, ys], axis=1).astype(np.float64)
    weights, centres, sides = _patches(points, (height, width))
    # The rigid fit leans on the face away from the regions that make expressions (forehead, temples, face sides):
    # in a broad expression the moving parts can cover half the face.
    distance = np.linalg.norm(face_points[:, None] - centres[None], axis=2) / (_RIGID_CLEARANCE * _EYE_PIXELS)
    rigid = _RigidMotion(face_points, 1.0 - np.exp(-0.5 * distance.min(axis=1) ** 2))
    face_pixels = ys * width + xs
    steps = []
    for before, after in zip(frames, frames[1:]):
        flow = cv2.calcOpticalFlowFarneback(before, after, None, *_FLOW_OPTIONS).reshape(-1, 2)
        motion = rigid.fit(flow[face_pixels])
        if np.abs(_apply(motion, face_points) - face_points).max() > _LARGE_STEP:
            # Farneback loses track of large motions (crops misaligned where the detector missed the face): undo
            # the rigid motion found and measure the face's own motion against that.
            after = cv2.warpAffine(after, motion, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_REPLICATE)
            flow = cv2.calcOpticalFlowFarneback(before, after, None, *_FLOW_OPTIONS).reshape(-1, 2)
            motion = rigid.fit(flow[face_pixels])
        # The rigid motion is affine, so its mean over a patch is its value at the patch's centre of weight.
        steps.append(weights @ flow - (_apply(motion, centres) - centres))
    steps = np.array(steps) / _EYE_PIXELS
    moves = np.stack([steps[..., 0] * sides, -steps[..., 1]], axis=-1)
    per_region, start = [], 0
    for region in _REGIONS:
        count = len(region.points)
        per_region.append(moves[:, start:start + count].mean(axis=1))
        start += count
    tracks = np.cumsum(np.stack(per_region, axis=1), axis=0)
    return np.concatenate([np.zeros((1, *tracks.shape[1:])), tracks])


def _same_brightness(frames: list[np.ndarray], face: np.ndarray) -> list[np.ndarray]:
    """Frames scaled to the first frame's mean brightness over the face: flicker would read as motion."""
    reference = float(frames[0][face].mean())
    return [cv2.convertScaleAbs(frame, alpha=reference / max(float(frame[face].mean()), 1.0)) for frame in frames]


def _patches(points: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every side of every region: Gaussian weights over the image (patches, H * W) summing to 1, their
    centres of weight (patches, 2), and the patch's outward sign along x (0 for a midline region)."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
    midline = float(points[27:31, 0].mean())   # the nose bridge
    sigma = _PATCH_SIGMA * _EYE_PIXELS
    weights, sides = [], []
    for region in _REGIONS:
        for group in region.points:
            # A face partly outside the crop is measured at the crop's edge.
            x, y = np.clip(points[list(group)].mean(axis=0), 0, (shape[1] - 1, shape[0] - 1))
            patch = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2)).ravel()
            weights.append(patch / patch.sum())
            sides.append(0.0 if len(region.points) == 1 else (1.0 if x > midline else -1.0))
    weights = np.array(weights)
    return weights, weights @ grid, np.array(sides)


class _RigidMotion:
    """Fits the similarity motion (shift, rotation, zoom) that best explains a flow field over the face, trusting
    each sampled point by a prior weight. A robust fit, so the local movements being described do not bend it."""

    def __init__(self, points: np.ndarray, prior: np.ndarray):
        self.centre = points.mean(axis=0)
        x, y = (points - self.centre).T
        ones, zeros = np.ones_like(x), np.zeros_like(x)
        # flow_x = a*x - b*y + tx, flow_y = b*x + a*y + ty
        self.design = np.concatenate([np.stack([x, -y, ones, zeros], axis=1), np.stack([y, x, zeros, ones], axis=1)])
        self.prior = np.concatenate([prior, prior])

    def fit(self, moves: np.ndarray) -> np.ndarray:
        """The rigid motion as a (2, 3) affine map from points before to after, explaining `moves` (the flow at the
        points)."""
        target = np.concatenate([moves[:, 0], moves[:, 1]]).astype(np.float64)
        weight = self.prior
        for _ in range(3):
            weighted = self.design * weight[:, None]
            params = np.linalg.solve(weighted.T @ self.design + _RIDGE, weighted.T @ target)
            residual = np.abs(self.design @ params - target)
            # Cauchy weights: points far off the fit (the moving features) count little in the next round.
            middle = len(residual) // 2
            scale = max(2.0 * float(np.partition(residual, middle)[middle]), 1e-3)   # twice the median
            weight = self.prior / (1.0 + (residual / scale) ** 2)
        a, b, tx, ty = params
        linear = np.array([[a, -b], [b, a]])
        # p -> p + linear (p - centre) + t
        return np.hstack([np.eye(2) + linear, (np.array([tx, ty]) - linear @ self.centre)[:, None]])


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:, :2].T + affine[:, 2]


def _blinks(tracks: np.ndarray, threshold: float) -> list[list[int]]:
    """Runs of at most _BLINK_FRAMES frames where the upper lids are further down than in the frames just before and
    after (one of them, at the clip's ends): all by a share of the threshold, the deepest by more than it and by much
    more than the brows dip there. Brows that lower (or rise, at the clip's start) carry the lids along: no blink."""
    lids = -tracks[:, _UPPER_LIDS, 1]
    brows = -tracks[:, [_INNER_BROWS, _OUTER_BROWS], 1]
    candidates = []
    for start in range(len(lids)):
        for end in range(start, min(start + _BLINK_FRAMES, len(lids))):
            sides = [frame for frame in (start - 1, end + 1) if 0 <= frame < len(lids)]
            if not sides:
                continue
            run, level = slice(start, end + 1), lids[sides].max()
            depth = lids[run].max() - level
            brow_depth = (brows[run].max(axis=0) - brows[sides].max(axis=0)).max()
            if lids[run].min() - level > _BLINK_EDGE * threshold and depth > max(threshold, _BLINK_BROWS * brow_depth):
                candidates.append((depth, end - start, start, end))
    # The deepest runs win (the one that spans a blink's closing and opening frames is deeper than its parts).
    chosen: list[tuple[int, int]] = []
    for _, _, start, end in sorted(candidates, reverse=True):
        if all(end < other_start - 1 or start > other_end + 1 for other_start, other_end in chosen):
            chosen.append((start, end))
    return [list(range(start, end + 1)) for start, end in sorted(chosen)]


def _without_blinks(tracks: np.ndarray, frames: list[int]) -> np.ndarray:
    """Tracks with the blink's frames filled in from their neighbours for the regions a blink moves: the lids, and
    the brows it drags."""
    keep = np.setdiff1d(np.arange(len(tracks)), frames)   # never empty: a blink has a frame on one side at least
    filled = tracks.copy()
    for region in _BLINKING:
        for axis in range(2):
            filled[frames, region, axis] = np.interp(frames, keep, tracks[keep, region, axis])
    return filled


def _direction(out: float, up: float, sided: bool) -> list[str]:
    """Direction names to look up, most specific first."""
    vertical = "up" if up > 0 else "down"
    if not sided:
        return [vertical]
    horizontal = "out" if out > 0 else "in"
    major, minor = (vertical, horizontal) if abs(up) >= abs(out) else (horizontal, vertical)
    if min(abs(up), abs(out)) >= 0.5 * max(abs(up), abs(out)):
        return [f"{vertical}-{horizontal}", major, minor]
    return [major]


def _movements(tracks: np.ndarray, threshold: float) -> list[_Movement]:
    """The movements above threshold, one per action unit (the largest, where regions share one)."""
    opening = tracks[:, _UPPER_LIDS, 1] - tracks[:, _LOWER_LIDS, 1]
    found: dict[str, _Movement] = {}
    for region, track in zip(_REGIONS, np.moveaxis(tracks, 1, 0)):
        if len(region.points) == 1:
            track = track * [0.0, 1.0]
        size = np.linalg.norm(track, axis=1)
        peak = float(size.max())
        if peak < threshold:
            continue
        # The apex is where the movement first comes near its largest: the peak of a held movement is noise.
        apex = int(np.argmax(size >= _APEX_SHARE * peak))
        names = [name for name in _direction(*track[apex], len(region.points) > 1) if name in region.moves]
        if not names:
            continue
        au, subject, verb = region.moves[names[0]]
        if au in _EYE_OPENING and _EYE_OPENING[au] * opening[apex] < threshold:
            continue
        along = track @ (track[apex] / size[apex])   # progress along the apex direction
        onset = apex
        while onset > 0 and along[onset - 1] >= _ONSET_SHARE * peak:
            onset -= 1
        eased = np.flatnonzero(along[apex:] < _OFFSET_SHARE * peak)
        movement = _Movement(au, subject, verb, peak, onset, apex, apex + int(eased[0]) if len(eased) else None)
        if au not in found or found[au].size < movement.size:
            found[au] = movement
    # A larger movement nearby drags these along, in faces as in the demo's warps: then they are not told apart.
    for au, draggers in _DRAGGED_BY.items():
        if au in found and any(found[au].size < found[other].size for other in draggers if other in found):
            found.pop(au)
    return list(found.values())


def _write(movements: list[_Movement], blinks: list[int], frames: int, threshold: float, detail: str) -> str:
    full = detail == "full"
    blinks_at = f" at {_frame_list(blinks)}" if blinks and full else ""
    if not movements:
        apart = f" apart from {'a blink' if len(blinks) == 1 else 'blinks'}{blinks_at}" if blinks else ""
        return f"No clear facial movement; the face stays still{apart}."
    # Movements that start and peak together are told together, the largest first; the groups in order of time.
    groups: list[list[_Movement]] = []
    for movement in sorted(movements, key=lambda m: (-m.size, m.au)):
        for group in groups:
            if abs(group[0].onset - movement.onset) <= _SAME_TIME and abs(group[0].apex - movement.apex) <= _SAME_TIME:
                group.append(movement)
                break
        else:
            groups.append([movement])
    groups.sort(key=lambda group: (group[0].onset, group[0].apex))
    phrases = [_join([_phrase(movement, threshold) for movement in group]) for group in groups]
    if full:
        sentences = [f"{_timing(group[0], frames)}, {phrase}" for group, phrase in zip(groups, phrases)]
    else:
        sentences = ["; ".join(phrases)]
    if blinks:
        sentences.append(f"the lids close briefly (blink){blinks_at}")
    return " ".join(sentence[0].upper() + sentence[1:] + "." for sentence in sentences)


def _phrase(movement: _Movement, threshold: float) -> str:
    ratio = movement.size / threshold
    strength = "slightly" if ratio < 2 else "clearly" if ratio < 4 else "strongly"
    return f"{movement.subject} {strength} {movement.verb} ({movement.au})"


def _timing(movement: _Movement, frames: int) -> str:
    start = "from the first frame" if movement.onset == 0 else f"from frame {movement.onset + 1}"
    if movement.apex == frames - 1:
        return f"{start} and still growing at the last frame"
    end = "held to the end" if movement.offset is None else f"easing by frame {movement.offset + 1}"
    return f"{start}, peaking at frame {movement.apex + 1} and {end}"


def _frame_list(frames: list[int]) -> str:
    numbers = [str(frame + 1) for frame in frames]
    return f"frame {numbers[0]}" if len(numbers) == 1 else f"frames {_join(numbers)}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
