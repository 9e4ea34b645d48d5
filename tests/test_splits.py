"""The validation hold-out of a training part (models/splits.py): seeded, disjoint, subject-disjoint where subjects
are known, stratified by class where they are not."""
from __future__ import annotations

from collections import Counter

from affectprep.models.splits import hold_out


def rows(n: int, classes: int, subjects: int | None = None) -> list[dict]:
    return [{"sample_id": f"s{i:03d}", "label": i % classes,
             "subject": None if subjects is None else f"p{i % subjects}"} for i in range(n)]


def test_without_subjects_each_class_keeps_its_share():
    samples = rows(200, 4)
    train, validation = hold_out(samples, 0.1, seed=3407)
    assert {s["sample_id"] for s in train} | {s["sample_id"] for s in validation} == {s["sample_id"] for s in samples}
    assert not {s["sample_id"] for s in train} & {s["sample_id"] for s in validation}
    assert Counter(s["label"] for s in validation) == {0: 5, 1: 5, 2: 5, 3: 5}
    assert hold_out(samples, 0.1, seed=3407) == (train, validation)          # seeded
    assert hold_out(samples, 0.1, seed=1) != (train, validation)


def test_with_subjects_no_subject_is_in_both_parts():
    samples = rows(300, 3, subjects=30)
    train, validation = hold_out(samples, 0.1, seed=3407)
    assert validation and not {s["subject"] for s in train} & {s["subject"] for s in validation}
    assert 0.05 <= len(validation) / len(samples) <= 0.2
    assert set(Counter(s["label"] for s in validation)) == {0, 1, 2}


def test_nothing_is_held_out_at_fraction_zero():
    samples = rows(20, 2)
    assert hold_out(samples, 0.0, seed=0) == (samples, [])
