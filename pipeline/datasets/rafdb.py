"""RAF-DB basic emotions: one official train/test split of single images.

Layout (the `basic/` folder of the release): `EmoLabel/list_patition_label.txt` (sic), one line per image,
`train_00001.jpg 5`; the prefix of the name is the split (train / test). Codes 1..7 = Surprise, Fear, Disgust,
Happiness, Sadness, Anger, Neutral, mapped by name to basic7 (affectprep.labels). Images: `Image/aligned/` holds the
release's 100x100 aligned faces named `train_00001_aligned.jpg`, `Image/original/` the source photos named as listed;
option `images` picks one. sample_id = the listed name without extension (`train_00001`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from affectprep.labels import BASIC7, UnknownLabel, rafdb_index

from .base import BadSample, register_adapter, text_lines
from .images import ImageDataset

SPLITS = ("train", "test")


@register_adapter("rafdb")
class RAFDB(ImageDataset):
    label_set = "basic7"

    @dataclass(frozen=True)
    class Options:
        images: Literal["aligned", "original"] = "aligned"
        media: str = "Image"                                    # holds aligned/ and original/
        labels: str = "EmoLabel/list_patition_label.txt"

    def annotation_files(self) -> list[Path]:
        return [self.require_file(self.options.labels)]

    def rows(self) -> Iterator[dict[str, Any]]:
        path = self.annotation_files()[0]
        media = self.media_folder(f"{self.options.media}/{self.options.images}")
        for line, text in text_lines(path):
            yield self.attempt(path, line, lambda known: self._sample(text.split(), media, path, line, known))

    def _sample(self, fields: list[str], media: Path, path: Path, line: int,
                known: dict[str, Any]) -> dict[str, Any]:
        if len(fields) != 2:
            raise BadSample(f"expected 2 fields (image label), got {len(fields)}")
        name, code = fields
        stem, suffix = os.path.splitext(name)   # strings, not Paths: 300k of them per index
        split = stem.split("_")[0]
        if split not in SPLITS or os.path.basename(name) != name:
            raise BadSample(f"image name '{name}' is not of the form train_00001.jpg or test_0001.jpg")
        known["split"] = split
        sample_id = self.claim(stem, path, line, known)
        try:
            label = rafdb_index(code)
        except UnknownLabel as e:
            raise BadSample(str(e)) from None
        file = f"{stem}_aligned{suffix}" if self.options.images == "aligned" else name
        image = self.checked_path(media, file) or str(self.image_file(self.inside(media, file)))
        return {"sample_id": sample_id, "media_path": image, "media_kind": "image", "label": label,
                "label_name": BASIC7[label], "labels": [label], "split": split, "fold": 0}
