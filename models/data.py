"""Training data straight from the Parquet stores: sample selection, clip augmentation, a streaming dataset.

`StoreClips` streams aligned face clips from a `faces` store one part file at a time, so memory is bounded by one
part plus the shuffle buffer (which holds JPEG bytes, decoded only when a clip is yielded) whatever the dataset's
size. Work is split across DataLoader workers and distributed ranks by `shard`: contiguous, balanced slices of one
per-epoch order, so every sample is yielded exactly once per epoch with no padding duplicates.

How the trainer should use it under several processes (accelerate):
- Pass rank=accelerator.process_index, world_size=accelerator.num_processes and do NOT `accelerator.prepare` the
  DataLoader (accelerate would shard it a second time); move batches to the device yourself.
- Ranks may hold one sample more than others, so one rank can have one batch more: train inside
  `with accelerator.join_uneven_inputs([model]):` so DDP does not wait for a batch that never comes.
- Evaluate with shuffle_buffer=0 (and view=None for multi-view testing), collect (sample_id, view, logits) per
  rank, and gather them with `accelerate.utils.gather_object`: the shards are disjoint and unpadded, so the
  gathered lists hold each (sample, view) exactly once; average the views per sample_id, then score.
- Call `set_epoch(epoch)` before each epoch and keep persistent_workers off, so the workers see the new epoch.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from affectprep import schema as S
from affectprep.store import Store

from .losses import inverse_sqrt_class_weights as _weights_from_counts

log = logging.getLogger(__name__)

# VideoMAE (GRACE's encoder) was pre-trained on frames normalised with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PARTS = ("train", "test", "val")

T = TypeVar("T")


@dataclass(frozen=True)
class Split:
    """Which samples: an official fold (train = the other folds, test = this fold) or the fixed `split` column."""
    fold: int | None = None          # None -> use the `split` column ("train"/"test"/"val")


def select_samples(index: Store, split: Split, part: str) -> list[dict]:
    """The index rows of `part` ("train", "test" or "val") with status ok and a label, sorted by sample_id."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    rows = [r for r in index.read(status=S.STATUS_OK).to_pylist() if r["label"] is not None and r["label"] >= 0]
    if split.fold is None:
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


def class_weights_from_labels(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-class loss weights proportional to 1/sqrt(class frequency) of `labels` (see losses.py)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values from {labels.min()} to {labels.max()}")
    return _weights_from_counts(np.bincount(labels, minlength=num_classes).tolist())


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

    Training: a random square crop covering `scale` of the frame's area (scale jitter) resized to `size`, a
    horizontal flip with probability `flip`, and with probability `erase` one random rectangle replaced by
    Gaussian noise (VideoMAE's "pixel" random erasing), then normalised by mean/std. Evaluation: resize and
    normalise only, so it is deterministic.
    """

    def __init__(self, size: int = 224, train: bool = True, scale: tuple[float, float] = (0.8, 1.0),
                 flip: float = 0.5, erase: float = 0.25, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, seed: int | None = None):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be an area range inside (0, 1], got {scale}")
        if not (0 <= flip <= 1 and 0 <= erase <= 1):
            raise ValueError(f"flip and erase are probabilities, got flip={flip}, erase={erase}")
        self.size, self.train, self.scale, self.flip, self.erase = size, train, scale, flip, erase
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
        self.rng = np.random.default_rng(seed)

    def __call__(self, frames: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB -> (T, 3, size, size) float32. `rng` overrides the augment's own generator."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape:
            raise ValueError(f"expected frames of shape (T, H, W, 3) and dtype uint8, got {frames.shape} "
                             f"{frames.dtype}")
        rng = rng if rng is not None else self.rng
        if self.train:
            frames = self._crop(frames, rng)
        frames = np.stack([self._resize(f) for f in frames])
        if self.train and rng.random() < self.flip:
            frames = frames[:, :, ::-1]
        clip = (frames.transpose(0, 3, 1, 2).astype(np.float32) / 255 - self.mean) / self.std
        if self.train and rng.random() < self.erase:
            self._erase(clip, rng)
        return torch.from_numpy(np.ascontiguousarray(clip))

    def _crop(self, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = frames.shape[1:3]
        # Aligned faces are square and centred: keep the crop square so the face is not distorted.
        side = max(1, round(min(height, width) * np.sqrt(rng.uniform(*self.scale))))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        return frames[:, top:top + side, left:left + side]

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


class StoreClips(IterableDataset):
    """Streams (frames, label, sample_id[, text]) from a faces store part by part: memory does not grow with the
    dataset. Shuffles within a bounded buffer (seeded per epoch); splits work across DataLoader workers AND
    across distributed ranks (rank/world_size arguments) without duplicating or dropping samples; picks view
    `view` (0 for training, None for every view: multi-view testing yields one item per sample and view).

    shuffle_buffer=0 keeps the store's order (evaluation). Samples that are not ok in the faces store, lack the
    asked view or lack a text (when `texts` is given) are skipped: `missing` counts them and `missing_reasons`
    says why, per sample. A clip whose JPEG will not decode is skipped with a logged warning.
    """

    def __init__(self, faces: Store, samples: list[dict], *, augment: ClipAugment,
                 texts: dict[str, str] | None = None, view: int | None = 0, shuffle_buffer: int = 256,
                 seed: int = 3407, rank: int = 0, world_size: int = 1):
        super().__init__()
        shard([], rank, world_size)  # validates rank and world_size
        if view is not None and view < 0:
            raise ValueError(f"view must be a view index >= 0 or None for every view, got {view}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.faces, self.augment, self.texts, self.view = faces, augment, texts, view
        self.shuffle_buffer, self.seed, self.rank, self.world_size = shuffle_buffer, seed, rank, world_size
        self.epoch = 0
        self.labels = {s["sample_id"]: int(s["label"]) for s in samples}
        self.missing_reasons: dict[str, str] = {}
        self._groups = self._part_groups(samples)
        self._part_of = {sid: i for i, group in enumerate(self._groups) for sid, _ in group}

    @property
    def missing(self) -> int:
        return len(self.missing_reasons)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Items this rank yields per epoch (all its workers together)."""
        return sum(len(self._views(n)) for _, n in shard(self._ordered(None), self.rank, self.world_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker_id])
        plan = self._ordered(np.random.default_rng([self.seed, self.epoch]) if self.shuffle_buffer else None)
        mine = shard(shard(plan, self.rank, self.world_size), worker_id, num_workers)
        items = self._read(mine)
        for item in _shuffled(items, self.shuffle_buffer, rng) if self.shuffle_buffer else items:
            decoded = self._decode(item, rng)
            if decoded is not None:
                yield decoded

    # ---- planning ------------------------------------------------------------------------------------------------

    def _part_groups(self, samples: list[dict]) -> list[list[tuple[str, int]]]:
        """(sample_id, num_views) of the usable samples, grouped by the part file holding their newest faces row.

        Reads only small columns; iter_tables yields one table per part, which gives the grouping.
        """
        wanted = set(self.labels)
        groups, found = [], set()
        for table in self.faces.iter_tables(["sample_id", "num_views"], ids=wanted, status=S.STATUS_OK):
            group = []
            for sid, num_views in zip(table.column("sample_id").to_pylist(), table.column("num_views").to_pylist()):
                found.add(sid)
                if self.view is not None and self.view >= num_views:
                    self.missing_reasons[sid] = f"has {num_views} view(s) in the faces store, view {self.view} asked"
                elif self.texts is not None and not self.texts.get(sid):
                    self.missing_reasons[sid] = "has no text"
                else:
                    group.append((sid, num_views))
            if group:
                groups.append(sorted(group))
        errors = dict(zip(*self._failed_rows(wanted - found)))
        for sid in sorted(wanted - found):
            self.missing_reasons[sid] = (f"failed in the faces stage: {errors[sid]}" if sid in errors
                                         else "is not in the faces store")
        return groups

    def _failed_rows(self, ids: set[str]) -> tuple[list[str], list[str]]:
        if not ids:
            return [], []
        table = self.faces.read(["sample_id", "error"], ids=ids, status=S.STATUS_FAILED)
        return table.column("sample_id").to_pylist(), [e or "no error recorded" for e in
                                                         table.column("error").to_pylist()]

    def _ordered(self, rng: np.random.Generator | None) -> list[tuple[str, int]]:
        """Every usable sample in this epoch's order: parts (and samples within a part) permuted by `rng`."""
        groups = [list(g) for g in self._groups]
        if rng is not None:
            groups = [groups[i] for i in rng.permutation(len(groups))]
            for g in groups:
                rng.shuffle(g)
        return [s for g in groups for s in g]

    def _views(self, num_views: int) -> list[int]:
        return list(range(num_views)) if self.view is None else [self.view]

    # ---- reading -------------------------------------------------------------------------------------------------

    def _read(self, mine: list[tuple[str, int]]) -> Iterator[tuple[str, int, list[bytes]]]:
        """(sample_id, view, JPEG crops of that view) in `mine`'s order, opening one part file at a time."""
        for _, run in itertools.groupby(mine, key=lambda entry: self._part_of[entry[0]]):
            run = list(run)
            # With ids given, iter_tables opens only the part holding their newest rows.
            tables = self.faces.iter_tables(["sample_id", "frames_per_view", "crops"], ids=[s for s, _ in run],
                                            status=S.STATUS_OK)
            rows = {r["sample_id"]: r for t in tables for r in t.to_pylist()}
            for sample_id, num_views in run:
                row = rows.pop(sample_id, None)
                if row is None:  # rewritten as failed since this dataset was made
                    log.warning("skipping %s: no longer ok in %s", sample_id, self.faces)
                    continue
                per_view = row["frames_per_view"]
                for view in self._views(num_views):
                    yield sample_id, view, row["crops"][view * per_view:(view + 1) * per_view]

    def _decode(self, item: tuple[str, int, list[bytes]], rng: np.random.Generator) -> dict[str, Any] | None:
        sample_id, view, crops = item
        try:
            frames = self.augment(decode_frames(crops), rng)
        except ValueError as e:
            log.warning("skipping %s view %d of %s: %s", sample_id, view, self.faces, e)
            return None
        out = {"frames": frames, "label": self.labels[sample_id], "sample_id": sample_id, "view": view}
        if self.texts is not None:
            out["text"] = self.texts[sample_id]
        return out


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
    """Items -> frames (B, T, 3, H, W), labels (B,), views (B,), sample_ids [B] and texts [B] (when given)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    shapes = {tuple(item["frames"].shape) for item in batch}
    if len(shapes) != 1:
        raise ValueError(f"clips in one batch must share a shape, got {sorted(shapes)}: use one frames_per_view "
                         f"and one ClipAugment size")
    out = {"frames": torch.stack([item["frames"] for item in batch]),
           "labels": torch.tensor([item["label"] for item in batch], dtype=torch.long),
           "views": torch.tensor([item["view"] for item in batch], dtype=torch.long),
           "sample_ids": [item["sample_id"] for item in batch]}
    if "text" in batch[0]:
        out["texts"] = [item["text"] for item in batch]
    return out
