"""Training data straight from the Parquet stores: sample selection, clip augmentation, streaming datasets.

`StoreSamples` streams one item per (sample, view) from a store one part file at a time, so memory is bounded by
one part plus the shuffle buffer (which holds undecoded bytes) whatever the dataset's size: `StoreClips` aligned
face clips or images (with landmarks and texts) from a `faces` store, `StoreFeatures` cached backbone tokens,
`StoreAudio` utterances. Work is split across DataLoader workers and distributed ranks by `shard`: contiguous,
balanced slices of one per-epoch order, so every sample is yielded exactly once per epoch with no padding
duplicates.

How the trainer (models/train.py) uses them under several processes (accelerate):
- rank=accelerator.process_index, world_size=accelerator.num_processes, and the DataLoader is NOT prepared by
  accelerate (it would shard a second time); batches are moved to the device by the trainer.
- Training sets drop_remainder=True, so every rank holds the same number of samples and runs the same number of
  steps (DDP waits for every rank at each step).
- Evaluation uses shuffle_buffer=0 and view=None (multi-view testing); each rank's (sample_id, view, scores) are
  gathered with `accelerate.utils.gather_object`: the shards are disjoint and unpadded, so the gathered lists hold
  each (sample, view) exactly once.
- `set_epoch(epoch)` before each epoch, persistent_workers off, so the workers see the new epoch.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from affectprep import schema as S
from affectprep.speech import MAX_UTTERANCE_SECONDS
from affectprep.store import Store

from .losses import inverse_sqrt_class_weights as _weights_from_counts
from .registry import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

PARTS = ("train", "test", "val")
# "target": expressions of a second domain (infrared faces for PCA) with few labels, trained beside "expression".
TASKS = ("expression", "au", "target")
# Batches of these tasks carry a "domain" (B,) tensor: 0 source (visible), 1 target (infrared).
DOMAINS = {"target": 1}

T = TypeVar("T")


@dataclass(frozen=True)
class Split:
    """Which samples: an official fold (train = the other folds, test = this fold) or the fixed `split` column."""
    fold: int | None = None          # None -> use the `split` column ("train"/"test"/"val")


def select_samples(index: Store, split: Split, part: str, task: str = "expression") -> list[dict]:
    """The index rows of `part` ("train", "test" or "val") with status ok and a label for `task` (an expression
    class, or AU occurrences for "au"), sorted by sample_id."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    labelled = ((lambda r: bool(r.get("au"))) if task == "au"
                else (lambda r: r["label"] is not None and r["label"] >= 0))
    rows = [r for r in index.read(status=S.STATUS_OK).to_pylist() if labelled(r)]
    if split.fold is None:
        folds = sorted({r["fold"] for r in rows if r["fold"]})
        if folds and not any(r["split"] for r in rows):
            raise ValueError(f"{index} has official folds ({', '.join(map(str, folds))}) and no fixed split: "
                             f"choose a fold")
        chosen = [r for r in rows if r["split"] == part]
    else:
        if part == "val":
            raise ValueError("fold-based splits have no validation part; use part 'train' or 'test'")
        folds = sorted({r["fold"] for r in rows if r["fold"]})
        if split.fold not in folds:
            have = f"folds {', '.join(map(str, folds))}" if folds else "no folds (use its fixed split instead)"
            raise ValueError(f"{index} has no fold {split.fold}; it has {have}")
        # Samples outside every fold (fold 0) belong to no official protocol, so neither part takes them.
        chosen = [r for r in rows if r["fold"] and (r["fold"] == split.fold) == (part == "test")]
    return sorted(chosen, key=lambda r: r["sample_id"])


def stratified_fraction(samples: list[dict], fraction: float, seed: int) -> list[dict]:
    """A seeded `fraction` of the samples (SSM's data scaling, Fig. 5 and Tables S1/S2: "20%, 40%, ... of the FE
    data"), stratified so each stratum keeps its share: an expression sample's stratum is its class, an AU
    sample's its AU occurrence pattern (the paper does not say how its fractions were drawn; stratifying keeps the
    class balance and the AU base rates of the full set, so a curve over fractions measures the amount of data).
    round(fraction * n) samples in all (at least one), split over the strata by largest remainder, ties broken at
    random; sorted by sample_id like `select_samples`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if fraction == 1 or not samples:
        return samples
    rng = np.random.default_rng([seed, round(fraction * 1_000_000)])
    strata: dict[Any, list[str]] = {}
    for s in samples:
        key = tuple(-1 if v is None or v != v else v for v in s["au"]) if s.get("au") else s["label"]
        strata.setdefault(key, []).append(s["sample_id"])
    keys = sorted(strata, key=repr)
    quotas = np.array([fraction * len(strata[k]) for k in keys])
    counts = np.floor(quotas).astype(int)
    short = max(1, round(fraction * len(samples))) - counts.sum()
    # Largest remainder first; a random key breaks ties (and orders equal remainders).
    order = np.lexsort((rng.random(len(keys)), -(quotas - counts)))
    counts[order[:short]] += 1
    keep = {sid for k, n in zip(keys, counts) for sid in rng.permutation(sorted(strata[k]))[:n].tolist()}
    return [s for s in samples if s["sample_id"] in keep]


def few_labels(samples: list[dict], per_class: int, seed: int) -> list[dict]:
    """The samples with their labels kept for a random `per_class` of each class and set to -1 (unlabelled) for the
    rest: the weakly supervised target domain. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    keep: set[str] = set()
    for label in sorted({s["label"] for s in samples}):
        ids = sorted(s["sample_id"] for s in samples if s["label"] == label)
        keep.update(rng.permutation(ids)[:per_class].tolist())
    return [s if s["sample_id"] in keep else {**s, "label": -1} for s in samples]


def with_domain(batch: dict[str, Any], domain: int | None) -> dict[str, Any]:
    """The batch with its "domain" tensor, for tasks of a second domain (see DOMAINS)."""
    if domain is None:
        return batch
    return {**batch, "domain": torch.full((len(batch["sample_ids"]),), domain, dtype=torch.long)}


def class_weights_from_labels(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-class loss weights proportional to 1/sqrt(class frequency) of `labels` (see losses.py)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values from {labels.min()} to {labels.max()}")
    return _weights_from_counts(np.bincount(labels, minlength=num_classes).tolist())


@dataclass(frozen=True)
class Refinement:
    """GReFEL's Data Refinement (§4, "Data Distribution Adjustments"; Implementation Details: N_pg = 512, B =
    500): every epoch, `per_group` (N_pg) images drawn at random from each video or face group, and from that
    pool `per_class` (B) images of each expression, "creating a batch of B x N_cls images per epoch". None keeps
    every image of a group / of the pool. Our choices where the paper is silent: a class with fewer than B images
    in the pool gives all of them plus random repeats up to B (the paper's classes must be balanced, and its
    "sample augmentation to expand the training set in class-imbalanced cases" repeats images under fresh
    augmentation); samples without an expression label (AU data, a target domain's unlabelled part) are kept,
    once each."""
    per_class: int | None = None
    per_group: int | None = None

    def __post_init__(self) -> None:
        for name in ("per_class", "per_group"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"refinement {name} must be at least 1, got {value}")

    def draw(self, samples: Sequence[tuple[str, int, str]], rng: np.random.Generator) -> list[str]:
        """(sample_id, label, group) of the usable samples -> the epoch's sample ids, in no particular order."""
        groups: dict[str, list[tuple[str, int, str]]] = {}
        for s in samples:
            if s[1] >= 0:
                groups.setdefault(s[2], []).append(s)
        classes: dict[int, list[str]] = {}
        for group in sorted(groups):
            members = sorted(groups[group])
            take = len(members) if self.per_group is None else min(self.per_group, len(members))
            for i in rng.permutation(len(members))[:take]:
                classes.setdefault(members[i][1], []).append(members[i][0])
        out = [s[0] for s in samples if s[1] < 0]
        for label in sorted(classes):
            ids = sorted(classes[label])
            if self.per_class is None:
                out += ids
                continue
            order = rng.permutation(len(ids))
            chosen = [ids[i] for i in order[:self.per_class]]
            if len(chosen) < self.per_class:
                chosen += [ids[i] for i in rng.integers(0, len(ids), self.per_class - len(chosen))]
            out += chosen
        return out


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The `rank`-th of `world_size` contiguous, balanced slices of items (sizes differ by at most one).

    The slices are disjoint and cover every item once, so no sample is duplicated or dropped. Contiguous slices
    of a part-ordered list keep each process reading only a few part files.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of world_size {world_size}")
    n = len(items)
    return list(items[rank * n // world_size:(rank + 1) * n // world_size])


class ClipAugment:
    """Clip augmentation with numpy and OpenCV: the same spatial transform for every frame of a clip.

    Training: a rotation by a random angle in [-rotation, rotation] degrees about the frame's centre (GReFEL §4
    "rotating"; edges reflected, our choice, so no black corners become a cue), a random square crop covering
    `scale` of the frame's area (scale jitter) resized to `size`, a horizontal flip with probability `flip`, a
    colour jitter (SSM §IV-B "color jittering", GReFEL §4 "color augmentation"), and with probability `erase` one
    random rectangle replaced by Gaussian noise (VideoMAE's "pixel" random erasing), then normalised by mean/std.
    color_jitter = (brightness, contrast, saturation, hue) as torchvision's ColorJitter reads them: factors drawn
    from [max(0, 1 - b), 1 + b] (hue: a shift in [-h, h] of the hue circle, h <= 0.5), applied in a random order;
    neither paper gives its strengths, a recipe chooses them. Evaluation: resize and normalise only, so it is
    deterministic. Off (rotation 0, jitter all 0) draws no random numbers, so runs without them are unchanged.
    """

    def __init__(self, size: int = 224, train: bool = True, scale: tuple[float, float] = (0.8, 1.0),
                 flip: float = 0.5, erase: float = 0.25, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, seed: int | None = None,
                 color_jitter: Sequence[float] = (0.0, 0.0, 0.0, 0.0), rotation: float = 0.0):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be an area range inside (0, 1], got {scale}")
        if not (0 <= flip <= 1 and 0 <= erase <= 1):
            raise ValueError(f"flip and erase are probabilities, got flip={flip}, erase={erase}")
        check_jitter(color_jitter, rotation)
        self.size, self.train, self.scale, self.flip, self.erase = size, train, scale, flip, erase
        self.color_jitter, self.rotation = tuple(float(v) for v in color_jitter), float(rotation)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
        self.rng = np.random.default_rng(seed)

    def __call__(self, frames: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB -> (T, 3, size, size) float32. `rng` overrides the augment's own generator."""
        return self.with_landmarks(frames, None, rng)[0]

    def with_landmarks(self, frames: np.ndarray, landmarks: np.ndarray | None,
                       rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Also moves landmarks (T, P, 2), given in [0, 1] of the frame, with the crop and the flip; a flip
        mirrors x and, for the 68-point layout, swaps left and right points so each index keeps its meaning."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape:
            raise ValueError(f"expected frames of shape (T, H, W, 3) and dtype uint8, got {frames.shape} "
                             f"{frames.dtype}")
        rng = rng if rng is not None else self.rng
        height, width = frames.shape[1:3]
        if self.train and self.rotation:
            frames, landmarks = _rotate(frames, landmarks, rng.uniform(-self.rotation, self.rotation))
        if self.train:
            top, left, side = self._crop_box(height, width, rng)
            frames = frames[:, top:top + side, left:left + side]
            if landmarks is not None:
                landmarks = (landmarks * np.array([width, height], np.float32) - [left, top]) / side
        frames = np.stack([self._resize(f) for f in frames])
        if self.train and rng.random() < self.flip:
            frames = frames[:, :, ::-1]
            if landmarks is not None:
                landmarks = _mirror_landmarks(landmarks)
        rgb = frames.astype(np.float32) / 255
        if self.train and any(self.color_jitter):
            rgb = _jitter(rgb, self.color_jitter, rng)
        clip = (rgb.transpose(0, 3, 1, 2) - self.mean) / self.std
        if self.train and rng.random() < self.erase:
            self._erase(clip, rng)
        points = None if landmarks is None else torch.from_numpy(np.ascontiguousarray(landmarks, dtype=np.float32))
        return torch.from_numpy(np.ascontiguousarray(clip)), points

    def _crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int]:
        # Aligned faces are square and centred: keep the crop square so the face is not distorted.
        side = max(1, round(min(height, width) * np.sqrt(rng.uniform(*self.scale))))
        return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side

    def _resize(self, frame: np.ndarray) -> np.ndarray:
        if frame.shape[:2] == (self.size, self.size):
            return frame
        shrinking = frame.shape[0] > self.size
        return cv2.resize(frame, (self.size, self.size), interpolation=cv2.INTER_AREA if shrinking
                          else cv2.INTER_LINEAR)

    def _erase(self, clip: np.ndarray, rng: np.random.Generator) -> None:
        """One rectangle of 2-33% of the area, aspect 0.3-3.3, the same in every frame (timm's defaults)."""
        area = self.size * self.size * rng.uniform(0.02, 1 / 3)
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
        h = min(self.size, max(1, round(np.sqrt(area * aspect))))
        w = min(self.size, max(1, round(np.sqrt(area / aspect))))
        top, left = rng.integers(0, self.size - h + 1), rng.integers(0, self.size - w + 1)
        clip[:, :, top:top + h, left:left + w] = rng.standard_normal((clip.shape[0], 3, h, w), dtype=np.float32)


def check_jitter(color_jitter: Sequence[float], rotation: float) -> None:
    """Raises ValueError unless color_jitter is (brightness, contrast, saturation, hue) strengths, each >= 0 and
    hue <= 0.5, and rotation an angle in [0, 180] degrees."""
    if len(color_jitter) != 4 or min(color_jitter) < 0 or color_jitter[3] > 0.5:
        raise ValueError(f"color_jitter must be (brightness, contrast, saturation, hue), each >= 0 and hue <= 0.5, "
                         f"got {list(color_jitter)}")
    if not 0 <= rotation <= 180:
        raise ValueError(f"rotation must be a maximum angle in [0, 180] degrees, got {rotation}")


def _rotate(frames: np.ndarray, landmarks: np.ndarray | None,
            degrees: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Every frame rotated by `degrees` (counter-clockwise) about its centre, and the landmarks ([0, 1] of the
    frame) moved with them."""
    height, width = frames.shape[1:3]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)
    frames = np.stack([cv2.warpAffine(f, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_REFLECT_101) for f in frames])
    if landmarks is not None:
        size = np.array([width, height], np.float32)
        pixels = landmarks * size - 0.5                       # pixel centres
        pixels = pixels @ matrix[:, :2].T.astype(np.float32) + matrix[:, 2].astype(np.float32)
        landmarks = (pixels + 0.5) / size
    return frames, landmarks


def _jitter(rgb: np.ndarray, strengths: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """torchvision ColorJitter's four adjustments on (T, H, W, 3) RGB in [0, 1], one draw for the whole clip."""
    def gray(x: np.ndarray) -> np.ndarray:
        return (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]

    def factor(strength: float) -> float:
        return float(rng.uniform(max(0.0, 1 - strength), 1 + strength))

    for op in rng.permutation(4):
        strength = strengths[op]
        if not strength:
            continue
        if op == 0:                                            # brightness
            rgb = rgb * factor(strength)
        elif op == 1:                                          # contrast: against each frame's mean grey
            mean = gray(rgb).mean(axis=(1, 2, 3), keepdims=True)
            rgb = mean + (rgb - mean) * factor(strength)
        elif op == 2:                                          # saturation: against each pixel's grey
            rgb = gray(rgb) + (rgb - gray(rgb)) * factor(strength)
        else:                                                  # hue: a turn of the hue circle
            shift = 360.0 * float(rng.uniform(-strength, strength))
            hsv = np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2HSV) for f in rgb.clip(0, 1)])
            hsv[..., 0] = (hsv[..., 0] + shift) % 360.0
            rgb = np.stack([cv2.cvtColor(f, cv2.COLOR_HSV2RGB) for f in hsv])
        rgb = rgb.clip(0, 1)
    return rgb.astype(np.float32)


# 68-point (iBUG) layout: the index each point takes in a mirrored face (jaw, brows, nose, eyes, mouth reversed).
_MIRROR_68 = np.array([*range(16, -1, -1), *range(26, 16, -1), *range(27, 31), *range(35, 30, -1),
                       45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
                       54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65])


def _mirror_landmarks(points: np.ndarray) -> np.ndarray:
    mirrored = points.copy()
    mirrored[..., 0] = 1.0 - mirrored[..., 0]
    return mirrored[:, _MIRROR_68] if points.shape[1] == len(_MIRROR_68) else mirrored


class StoreSamples(IterableDataset):
    """Streams one item per (sample, view) from a store, part by part: memory does not grow with the dataset.
    Shuffles within a bounded buffer (seeded per epoch); splits work across DataLoader workers AND across
    distributed ranks (rank/world_size arguments) without duplicating or dropping samples; picks view `view`
    (0 for training, None for every view — or the first `max_views` — for multi-view testing, which yields one
    item per sample and view).

    shuffle_buffer=0 keeps the store's order (evaluation). drop_remainder=True (training under several processes)
    leaves out the few samples of an epoch's order that would give one rank more than the others, so every rank
    runs the same number of steps; which samples those are changes with the epoch's shuffle. Samples that are not
    ok in the store, lack the asked view or lack a text (when `texts` is given) are skipped: `missing` counts them
    and `missing_reasons` says why, per sample. An item that will not decode is skipped with a logged warning.

    Subclasses say which columns to read and how a row becomes an item.
    """

    plan_columns: tuple[str, ...] = ("sample_id",)   # small columns that give each sample's number of views
    item_columns: tuple[str, ...] = ("sample_id",)   # what `_item` needs

    def __init__(self, store: Store, samples: list[dict], *, texts: dict[str, str] | None = None,
                 view: int | None = 0, max_views: int | None = None, shuffle_buffer: int = 256,
                 seed: int = 3407, rank: int = 0, world_size: int = 1, drop_remainder: bool = False,
                 refine: Refinement | None = None):
        super().__init__()
        shard([], rank, world_size)  # validates rank and world_size
        if view is not None and view < 0:
            raise ValueError(f"view must be a view index >= 0 or None for every view, got {view}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if max_views is not None and max_views < 1:
            raise ValueError(f"max_views must be at least 1, got {max_views}")
        self.store, self.texts, self.view, self.max_views = store, texts, view, max_views
        self.shuffle_buffer, self.seed, self.rank, self.world_size = shuffle_buffer, seed, rank, world_size
        self.drop_remainder, self.refine = drop_remainder, refine
        # A sample's video or face group for the refinement: the media it was cut from (a video's frames share it).
        self.group_of = {s["sample_id"]: s.get("media_path") or s["sample_id"] for s in samples}
        self.epoch = 0
        self.labels = {s["sample_id"]: _label(s.get("label")) for s in samples}
        self.aus = {s["sample_id"]: s["au"] for s in samples if s.get("au")}
        self.missing_reasons: dict[str, str] = {}
        self._groups = self._part_groups(samples)
        self._part_of = {sid: i for i, group in enumerate(self._groups) for sid, _ in group}

    @property
    def missing(self) -> int:
        return len(self.missing_reasons)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def usable_ids(self) -> list[str]:
        """Every sample this dataset can yield (all ranks together)."""
        return [sid for group in self._groups for sid, _ in group]

    def __len__(self) -> int:
        """Items this rank yields per epoch (all its workers together)."""
        return sum(len(self._views(n)) for _, n in self._mine(None))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker_id])
        order = np.random.default_rng([self.seed, self.epoch]) if self.shuffle_buffer else None
        mine = shard(self._mine(order), worker_id, num_workers)
        items = self._read(mine)
        for item in _shuffled(items, self.shuffle_buffer, rng) if self.shuffle_buffer else items:
            decoded = self._decode(item, rng)
            if decoded is not None:
                yield decoded

    # ---- planning ------------------------------------------------------------------------------------------------

    def _num_views(self, row: dict[str, Any]) -> int:
        return 1

    def _part_groups(self, samples: list[dict]) -> list[list[tuple[str, int]]]:
        """(sample_id, num_views) of the usable samples, grouped by the part file holding their newest row.

        Reads only small columns; iter_tables yields one table per part, which gives the grouping.
        """
        wanted = set(self.labels)
        groups, found = [], set()
        stage = self.store.stage
        for table in self.store.iter_tables(list(self.plan_columns), ids=wanted, status=S.STATUS_OK):
            group = []
            for row in table.to_pylist():
                sid, num_views = row["sample_id"], self._num_views(row)
                found.add(sid)
                reason = self._unusable(sid, num_views)
                if reason:
                    self.missing_reasons[sid] = reason
                else:
                    group.append((sid, num_views))
            if group:
                groups.append(sorted(group))
        errors = dict(zip(*self._failed_rows(wanted - found)))
        for sid in sorted(wanted - found):
            self.missing_reasons[sid] = (f"failed in the {stage} stage: {errors[sid]}" if sid in errors
                                         else f"is not in the {stage} store")
        return groups

    def _unusable(self, sample_id: str, num_views: int) -> str | None:
        """Why a sample that is ok in the store cannot be used, or None."""
        if self.view is not None and self.view >= num_views:
            return f"has {num_views} view(s) in the {self.store.stage} store, view {self.view} asked"
        if self.texts is not None and not self.texts.get(sample_id):
            return "has no text"
        return None

    def _failed_rows(self, ids: set[str]) -> tuple[list[str], list[str]]:
        if not ids:
            return [], []
        table = self.store.read(["sample_id", "error"], ids=ids, status=S.STATUS_FAILED)
        return table.column("sample_id").to_pylist(), [e or "no error recorded" for e in
                                                         table.column("error").to_pylist()]

    def _mine(self, rng: np.random.Generator | None) -> list[tuple[str, int]]:
        """This rank's share of the epoch's order: parts (and samples within a part) permuted by `rng`."""
        groups = [list(g) for g in self._groups]
        if self.refine is not None:
            groups = self._refined(groups)
        if rng is not None:
            groups = [groups[i] for i in rng.permutation(len(groups))]
            for g in groups:
                rng.shuffle(g)
        order = [s for g in groups for s in g]
        if self.drop_remainder:
            order = order[:len(order) - len(order) % self.world_size]
        return shard(order, self.rank, self.world_size)

    def _refined(self, groups: list[list[tuple[str, int]]]) -> list[list[tuple[str, int]]]:
        """The part groups holding this epoch's refined draw (a sample drawn twice appears twice). Its own
        generator of (seed, epoch), so `len` and the epoch's iteration agree."""
        usable = [(sid, self.labels[sid], self.group_of[sid]) for g in groups for sid, _ in g]
        drawn = Counter(self.refine.draw(usable, np.random.default_rng([self.seed, self.epoch, 0x5EF1])))
        return [[entry for entry in g for _ in range(drawn[entry[0]])] for g in groups]

    def _views(self, num_views: int) -> list[int]:
        if self.view is not None:
            return [self.view]
        return list(range(num_views if self.max_views is None else min(num_views, self.max_views)))

    # ---- reading -------------------------------------------------------------------------------------------------

    def _read(self, mine: list[tuple[str, int]]) -> Iterator[tuple[dict[str, Any], int]]:
        """(row, view) in `mine`'s order, opening one part file at a time."""
        for _, run in itertools.groupby(mine, key=lambda entry: self._part_of[entry[0]]):
            run = list(run)
            # With ids given, iter_tables opens only the part holding their newest rows.
            tables = self.store.iter_tables(list(self.item_columns), ids=[s for s, _ in run], status=S.STATUS_OK)
            rows = {r["sample_id"]: r for t in tables for r in t.to_pylist()}
            joined = self._joined([s for s, _ in run])
            for sample_id, num_views in run:
                row = rows.get(sample_id)   # (not popped: a refined epoch may draw a sample twice)
                if row is None:  # rewritten as failed since this dataset was made
                    log.warning("skipping %s: no longer ok in %s", sample_id, self.store)
                    continue
                row.update(joined.get(sample_id, {}))
                for view in self._views(num_views):
                    yield row, view

    def _joined(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Columns of other stores for these samples, merged into their rows (none by default)."""
        return {}

    def _decode(self, item: tuple[dict[str, Any], int], rng: np.random.Generator) -> dict[str, Any] | None:
        row, view = item
        sample_id = row["sample_id"]
        try:
            out = self._item(row, view, rng)
        except ValueError as e:
            log.warning("skipping %s view %d of %s: %s", sample_id, view, self.store, e)
            return None
        out.update(label=self.labels[sample_id], sample_id=sample_id, view=view)
        if sample_id in self.aus:
            out["au"] = self.aus[sample_id]
        if self.texts is not None:
            out["text"] = self.texts[sample_id]
        return out

    def _item(self, row: dict[str, Any], view: int, rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError


class StoreClips(StoreSamples):
    """Aligned face clips (or single aligned images) from a `faces` store, augmented by `augment`; with
    landmarks=True each item also carries the clip's landmarks (T, 68, 2) in [0, 1] of the augmented crop.
    num_frames: frames per item, taken evenly from each stored view when it holds a different number (a 4-frame
    tiny model on 16-frame clips; one frame of a clip for an image model); None keeps them all."""

    plan_columns = ("sample_id", "num_views")

    def __init__(self, faces: Store, samples: list[dict], *, augment: ClipAugment, landmarks: bool = False,
                 num_frames: int | None = None, **options):
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.augment, self.landmarks, self.num_frames = augment, landmarks, num_frames
        self.item_columns = (("sample_id", "frames_per_view", "crops", "size", "frame_indices")
                             + (("landmarks",) if landmarks else ()))
        super().__init__(faces, samples, **options)

    def _num_views(self, row: dict[str, Any]) -> int:
        return row["num_views"]

    def _item(self, row: dict[str, Any], view: int, rng: np.random.Generator) -> dict[str, Any]:
        per_view = row["frames_per_view"]
        picked = view * per_view + (np.arange(per_view) if self.num_frames is None else
                                    np.linspace(0, per_view - 1, self.num_frames).round().astype(int))
        frames = decode_frames([row["crops"][i] for i in picked])
        # The source frame number of each picked frame (explanations label frames by them), where the store has them.
        indices = ({} if row.get("frame_indices") is None else
                   {"frame_indices": torch.tensor([row["frame_indices"][i] for i in picked], dtype=torch.long)})
        if not self.landmarks:
            return {"frames": self.augment(frames, rng), **indices}
        points = np.asarray([row["landmarks"][i] for i in picked], dtype=np.float32)
        points = points.reshape(len(picked), -1, 2) / float(row["size"])
        clip, points = self.augment.with_landmarks(frames, points, rng)
        return {"frames": clip, "landmarks": points, **indices}


class StoreFeatures(StoreSamples):
    """Cached frozen-backbone features (`train --from features`): VideoMAE tokens of one view (T', N, D) from a
    `features` store and, when `text_features` is given, the text tokens (L, D) from a `text_features` store, as
    float32 tensors. A sample without text tokens is skipped and counted in `missing_reasons`."""

    plan_columns = ("sample_id", "visual_shape")
    item_columns = ("sample_id", "visual_tokens", "visual_shape")

    def __init__(self, features: Store, samples: list[dict], *, text_features: Store | None = None, **options):
        self.text_features = text_features
        self._with_text = (None if text_features is None else
                           {sid for sid, status in text_features.statuses().items() if status == S.STATUS_OK})
        super().__init__(features, samples, **options)

    def _unusable(self, sample_id: str, num_views: int) -> str | None:
        if self._with_text is not None and sample_id not in self._with_text:
            return f"has no text tokens in {self.text_features}"
        return super()._unusable(sample_id, num_views)

    def _num_views(self, row: dict[str, Any]) -> int:
        if not row["visual_shape"]:
            raise ValueError(f"{self.store} holds no VideoMAE tokens: set stages.features.video_encoder and run "
                             f"the features stage")
        return row["visual_shape"][0]

    def _joined(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        if self.text_features is None:
            return {}
        table = self.text_features.read(["sample_id", "text_tokens", "text_shape"], ids=ids, status=S.STATUS_OK)
        return {row["sample_id"]: row for row in table.to_pylist()}

    def _item(self, row: dict[str, Any], view: int, rng: np.random.Generator) -> dict[str, Any]:
        visual = _array(row["visual_tokens"], row["visual_shape"])[view]
        item = {"visual_tokens": torch.from_numpy(visual.astype(np.float32))}
        if self.text_features is not None:
            if row.get("text_tokens") is None:
                raise ValueError(f"no text tokens in {self.text_features}")
            text = _array(row["text_tokens"], row["text_shape"])
            item["text_tokens"] = torch.from_numpy(text.astype(np.float32))
        return item


class StoreAudio(StoreSamples):
    """Utterances from an `audio` store (see schema.AUDIO): the 16 kHz waveform as float32 in [-1, 1] and its
    transcript as the item's text. Training takes a random window of at most `max_seconds`; evaluation the start
    (the audio_features stage cuts there too: affectprep/speech.py)."""

    item_columns = ("sample_id", "waveform", "sample_rate", "transcript")

    def __init__(self, audio: Store, samples: list[dict], *, train: bool,
                 max_seconds: float = MAX_UTTERANCE_SECONDS, **options):
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        self.train, self.max_seconds = train, max_seconds
        super().__init__(audio, samples, **options)

    def _item(self, row: dict[str, Any], view: int, rng: np.random.Generator) -> dict[str, Any]:
        pcm = np.frombuffer(row["waveform"] or b"", dtype="<i2")
        if pcm.size == 0:
            raise ValueError("empty waveform")
        limit = int(self.max_seconds * row["sample_rate"])
        start = int(rng.integers(0, pcm.size - limit + 1)) if self.train and pcm.size > limit else 0
        waveform = pcm[start:start + limit].astype(np.float32) / 32768.0
        return {"waveform": torch.from_numpy(waveform), "text": row["transcript"] or ""}


class StoreAudioFeatures(StoreSamples):
    """Cached speech encoder frames (T, D) and transcript tokens (L, D) of each utterance from an
    `audio_features` store, as float32 tensors (MGCMA `--from features`)."""

    item_columns = ("sample_id", "audio_tokens", "audio_shape", "text_tokens", "text_shape")

    def _item(self, row: dict[str, Any], view: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"audio_tokens": torch.from_numpy(_array(row["audio_tokens"], row["audio_shape"]).astype(np.float32)),
                "text_tokens": torch.from_numpy(_array(row["text_tokens"], row["text_shape"]).astype(np.float32))}


def _array(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """A cached float16 array (raw little-endian bytes + shape) -> numpy."""
    array = np.frombuffer(data, dtype="<f2")
    if array.size != int(np.prod(shape)):
        raise ValueError(f"cached array has {array.size} values, its shape {list(shape)} needs {np.prod(shape)}")
    return array.reshape(shape)


def _label(value: Any) -> int:
    return -1 if value is None else int(value)


def decode_frames(crops: Sequence[bytes]) -> np.ndarray:
    """JPEG crops -> (T, H, W, 3) uint8 RGB."""
    frames = []
    for i, data in enumerate(crops):
        image = cv2.imdecode(np.frombuffer(data or b"", np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"crop {i} is not a decodable JPEG")
        frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"crops differ in size: {sorted({f.shape for f in frames})}")
    return np.stack(frames)


def _shuffled(items: Iterator[T], buffer_size: int, rng: np.random.Generator) -> Iterator[T]:
    """Yield items in random order using a buffer of at most buffer_size: each arrival evicts a random resident."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.integers(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> one batch (see models/registry.py for the keys): frames (B, T, 3, H, W) or cached visual_tokens,
    labels (B,), views (B,), sample_ids [B], and when the items have them: frame_indices (B, T) (the frames'
    source frame numbers), au (B, M), landmarks (B, T, P, 2), texts [B], cached text_tokens (B, L, D) /
    audio_tokens (B, T, D) padded with text_mask / audio_mask, waveform (B, N) padded with waveform_mask (B, N)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {"labels": torch.tensor([item["label"] for item in batch], dtype=torch.long),
                           "views": torch.tensor([item["view"] for item in batch], dtype=torch.long),
                           "sample_ids": [item["sample_id"] for item in batch]}
    for name in ("frames", "frame_indices", "visual_tokens", "landmarks"):
        if name in batch[0]:
            shapes = {tuple(item[name].shape) for item in batch}
            if len(shapes) != 1:
                raise ValueError(f"{name} in one batch must share a shape, got {sorted(shapes)}: use one "
                                 f"frames_per_view and one ClipAugment size")
            out[name] = torch.stack([item[name] for item in batch])
    if "au" in batch[0]:
        out["au"] = torch.tensor([item.get("au") for item in batch], dtype=torch.float32)
    if "text" in batch[0]:
        out["texts"] = [item["text"] for item in batch]
    for name in ("text", "audio"):
        if f"{name}_tokens" in batch[0]:
            out[f"{name}_tokens"], out[f"{name}_mask"] = pad_tokens([item[f"{name}_tokens"] for item in batch])
    if "waveform" in batch[0]:
        waveforms, mask = pad_tokens([item["waveform"][:, None] for item in batch])
        out["waveform"], out["waveform_mask"] = waveforms[..., 0], mask
    return out


def pad_tokens(sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences (L_i, D) -> zero-padded (B, max L, D) and the mask of real tokens (B, max L)."""
    length = max(seq.shape[0] for seq in sequences)
    tokens = sequences[0].new_zeros(len(sequences), length, sequences[0].shape[-1])
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        tokens[i, :seq.shape[0]], mask[i, :seq.shape[0]] = seq, True
    return tokens, mask
