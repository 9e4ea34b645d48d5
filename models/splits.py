"""A run's three disjoint parts per task: train, validation, test (issue 11 §2; model selection never sees test).

test        the official test part: fold k's test set, or the official test split.
validation  the dataset's official validation split where it has one (FER+ Valid, ...); else a seeded hold-out of
            the training part, `val_fraction` of it (default 0.1): subject-disjoint where the index knows every
            training sample's subject (no subject in both train and validation, so validation scores a person the
            model never saw, as test does), stratified by class otherwise (each class keeps its share). With
            subjects known, subjects are taken in a seeded order, one class-balancing pick at a time: the subject
            whose samples bring the hold-out's class counts closest to `val_fraction` of each class's (our choice,
            a greedy stratification; exact stratification by subject is a bin-packing problem).
train       the rest of the official training part.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np


def hold_out(samples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation) of the training part `samples` (index rows), disjoint, both sorted by sample_id."""
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    rng = np.random.default_rng(seed)
    subjects = [s.get("subject") for s in samples]
    if all(subjects) and len(set(subjects)) > 1:
        held = _by_subject(samples, fraction, rng)
    else:
        held = _by_class(samples, fraction, rng)
    train = [s for s in samples if s["sample_id"] not in held]
    validation = [s for s in samples if s["sample_id"] in held]
    return sorted(train, key=_id), sorted(validation, key=_id)


def _by_class(samples: list[dict], fraction: float, rng: np.random.Generator) -> set[str]:
    by_label: dict[object, list[str]] = defaultdict(list)
    for s in samples:
        by_label[_stratum(s)].append(s["sample_id"])
    held: set[str] = set()
    for label in sorted(by_label, key=str):
        ids = sorted(by_label[label])
        take = min(len(ids) - 1, round(fraction * len(ids)))   # every class keeps a training sample
        held.update(rng.permutation(ids)[:max(take, 0)].tolist())
    if not held:   # tiny sets: at least one validation sample, from the largest class
        largest = max(by_label.values(), key=len)
        held.add(sorted(largest)[int(rng.integers(len(largest)))])
    return held


def _by_subject(samples: list[dict], fraction: float, rng: np.random.Generator) -> set[str]:
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_subject[s["subject"]].append(s)
    order = [sorted(by_subject)[i] for i in rng.permutation(len(by_subject))]
    totals = Counter(_stratum(s) for s in samples)
    goal = {label: fraction * n for label, n in totals.items()}
    wanted = fraction * len(samples)
    held_counts: Counter = Counter()
    chosen: list[str] = []
    remaining = list(order)
    while remaining and sum(held_counts.values()) < wanted and len(chosen) < len(by_subject) - 1:
        def error(subject: str) -> float:
            counts = held_counts + Counter(_stratum(s) for s in by_subject[subject])
            return sum((counts[label] - goal[label]) ** 2 for label in goal)
        best = min(remaining, key=error)   # ties keep the seeded order
        remaining.remove(best)
        chosen.append(best)
        held_counts += Counter(_stratum(s) for s in by_subject[best])
    return {s["sample_id"] for subject in chosen for s in by_subject[subject]}


def _stratum(sample: dict) -> object:
    label = sample.get("label")
    return label if label is not None and label >= 0 else "au"


def _id(sample: dict) -> str:
    return sample["sample_id"]
