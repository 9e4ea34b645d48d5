"""DFEW: 5-fold single-labelled clips.

Layout: `EmoLabel_DataSplit/{train,test}(single-labeled)/set_N.csv`, header `video_name,label`, labels 1..7 (DFEW's
official codes, see affectprep.labels). The five test sets partition the clips and each train set is the other four
folds, so the test csvs alone determine every sample and its fold.

The csvs give clip numbers (`1`, `2`, ...). Releases name the media differently: `Clip/original/1.mp4`, or
zero-padded frame folders `Clip/clip_224x224/00001/`; both spellings are tried. sample_id = the 5-digit name.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affectprep.labels import BASIC7, UnknownLabel, dfew_index

from .base import BadSample, DatasetAdapter, csv_fields, register_adapter, text_lines

SPLITS = "EmoLabel_DataSplit/test(single-labeled)"
FOLDS = 5


@register_adapter("dfew")
class DFEW(DatasetAdapter):
    label_set = "basic7"

    @dataclass(frozen=True)
    class Options:
        media: str = "Clip/original"    # videos <name>.mp4 or frame folders <name>/; relative to the root or absolute

    def annotation_files(self) -> list[Path]:
        return [self.require_file(f"{SPLITS}/set_{fold}.csv") for fold in range(1, FOLDS + 1)]

    def rows(self) -> Iterator[dict[str, Any]]:
        files = self.annotation_files()
        media = self.media_folder(self.options.media)
        for fold, path in enumerate(files, start=1):
            for line, text in text_lines(path):
                if line == 1 and text.split(",")[0].strip() == "video_name":
                    continue
                yield self.attempt(path, line, lambda known: self._sample(text, fold, media, path, line, known))

    def _sample(self, text: str, fold: int, media: Path, path: Path, line: int,
                known: dict[str, Any]) -> dict[str, Any]:
        fields = csv_fields(text)
        if len(fields) != 2:
            raise BadSample(f"expected 2 columns (video_name,label), got {len(fields)}")
        name, code = (f.strip() for f in fields)
        if not name.isdigit():
            raise BadSample(f"video_name '{name}' is not a clip number")
        known["fold"] = fold
        sample_id = self.claim(f"{int(name):05d}", path, line, known)
        try:
            label = dfew_index(code)
        except UnknownLabel as e:
            raise BadSample(str(e)) from None
        media_path, kind = self.find_clip(media, [sample_id, str(int(name))])
        return {"sample_id": sample_id, "media_path": str(media_path), "media_kind": kind, "label": label,
                "label_name": BASIC7[label], "labels": [label], "fold": fold}

