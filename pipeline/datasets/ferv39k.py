"""FERV39k: one official train/test split.

Layout: `4_setups/All_scenes/{train,test}_All.csv`, space separated `Scene/Emotion/id EmotionName`
(e.g. `Action/Sad/0010 Sad`); the clips are frame folders `2_ClipsforFaceCrop/Scene/Emotion/id/`. Labels are mapped
by NAME to basic7: repositories disagree on FERV39k's numeric order, so no number is trusted.
sample_id = the clip path as the csv writes it (`Action/Sad/0010`).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affectprep.labels import BASIC7, UnknownLabel, ferv39k_index

from .base import BadSample, DatasetAdapter, register_adapter, text_lines

SPLITS = ("train", "test")


@register_adapter("ferv39k")
class FERV39k(DatasetAdapter):
    label_set = "basic7"

    @dataclass(frozen=True)
    class Options:
        media: str = "2_ClipsforFaceCrop"           # frame folders (or videos) Scene/Emotion/id; relative or absolute
        annotations: str = "4_setups/All_scenes"    # folder holding train_All.csv and test_All.csv

    def annotation_files(self) -> list[Path]:
        return [self.require_file(f"{self.options.annotations}/{split}_All.csv") for split in SPLITS]

    def rows(self) -> Iterator[dict[str, Any]]:
        files = self.annotation_files()
        media = self.media_folder(self.options.media)
        for split, path in zip(SPLITS, files):
            for line, text in text_lines(path):
                fields = text.split()
                if line == 1 and _is_header(fields):
                    continue
                yield self.attempt(path, line, lambda known: self._sample(fields, split, media, path, line, known))

    def _sample(self, fields: list[str], split: str, media: Path, path: Path, line: int,
                known: dict[str, Any]) -> dict[str, Any]:
        if len(fields) != 2:
            raise BadSample(f"expected 2 fields (Scene/Emotion/id EmotionName), got {len(fields)}")
        clip, name = fields
        known["split"] = split
        sample_id = self.claim(clip, path, line, known)
        try:
            label = ferv39k_index(name)
        except UnknownLabel as e:
            raise BadSample(str(e)) from None
        media_path, kind = self.find_clip(media, [clip])
        return {"sample_id": sample_id, "media_path": str(media_path), "media_kind": kind, "label": label,
                "label_name": BASIC7[label], "labels": [label], "split": split, "fold": 0}


def _is_header(fields: list[str]) -> bool:
    """Some copies start with a column-name line; a clip path always has a '/' and a known emotion."""
    if "/" in fields[0]:
        return False
    try:
        ferv39k_index(fields[-1])
    except UnknownLabel:
        return True
    return False
