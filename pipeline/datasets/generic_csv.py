"""Any other dataset, described by one CSV: columns `path,label,split`, optional `subject` and `fold`.

Paths are relative to the dataset root; the media kind follows from the path (a folder = frames; video, image and
audio by extension). Labels are names, case-insensitive (lower-cased like every canonical name); the label set is
option `labels` (the canonical order, which a model's output index follows) or, when empty, the sorted unique names
of the file. `split` is train/val/test or empty; `fold` an
integer >= 1 or empty (0 = no folds). sample_id = the path as written.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from affectprep.labels import LabelSet

from .base import (AUDIO_EXTS, IMAGE_EXTS, VIDEO_EXTS, BadSample, DatasetAdapter, DatasetError, csv_fields,
                   register_adapter, text_lines)

REQUIRED = ("path", "label", "split")
OPTIONAL = ("subject", "fold")
SPLITS = ("train", "val", "test")


@register_adapter("csv")
class CSVDataset(DatasetAdapter):
    label_set = "csv"

    @dataclass(frozen=True)
    class Options:
        file: str = "labels.csv"            # relative to the dataset root
        labels: tuple[str, ...] = ()        # label names in canonical order; empty = sorted unique names in the file

    def annotation_files(self) -> list[Path]:
        return [self.require_file(self.options.file)]

    def records(self) -> tuple[list[str], list[tuple[int, str]]]:
        """(header, [(line, text)]) with the header checked."""
        path = self.annotation_files()[0]
        lines = list(text_lines(path))
        try:
            header = [h.strip().lower() for h in csv_fields(lines[0][1])] if lines else []
        except BadSample:
            header = []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise DatasetError(f"csv: {self.options.file} has no column(s) {', '.join(missing)} in its header "
                               f"(expected {','.join(REQUIRED)}[,{','.join(OPTIONAL)}])")
        return header, lines[1:]

    def labels(self) -> LabelSet:
        """Label names are case-insensitive ("Happy" and "happy" are one class), lower-cased as every canonical
        name is."""
        if self.options.labels:
            names = tuple(name.strip().lower() for name in self.options.labels)
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise DatasetError(f"csv: option labels names {', '.join(repeated)} more than once (names are "
                                   f"case-insensitive)")
            return LabelSet("csv", names)
        header, records = self.records()
        column = header.index("label")
        names = set()
        for _, text in records:
            try:
                fields = csv_fields(text)
            except BadSample:
                continue        # that row fails on its own
            if len(fields) == len(header) and fields[column].strip():
                names.add(fields[column].strip().lower())
        return LabelSet("csv", tuple(sorted(names)))

    def rows(self) -> Iterator[dict[str, Any]]:
        path = self.annotation_files()[0]
        header, records = self.records()
        labels = self.labels()
        for line, text in records:
            yield self.attempt(path, line, lambda known: self._sample(header, csv_fields(text), labels, path, line,
                                                                      known))

    def _sample(self, header: list[str], fields: list[str], labels: LabelSet, path: Path, line: int,
                known: dict[str, Any]) -> dict[str, Any]:
        if len(fields) != len(header):
            raise BadSample(f"expected {len(header)} columns ({','.join(header)}), got {len(fields)}")
        values = {name: value.strip() for name, value in zip(header, fields)}
        split = values["split"].lower() or None
        if split is not None and split not in SPLITS:
            raise BadSample(f"split '{values['split']}' (expected {', '.join(SPLITS)} or empty)")
        fold = values.get("fold") or "0"
        if not fold.isdigit():
            raise BadSample(f"fold '{fold}' is not a non-negative integer")
        known.update(split=split, fold=int(fold), subject=values.get("subject") or None)
        relative = values["path"].replace("\\", "/")
        if not relative:
            raise BadSample("empty path")
        sample_id = self.claim(PurePosixPath(relative).as_posix(), path, line, known)
        name = values["label"].lower()
        label = labels.names.index(name) if name in labels.names else None
        if label is None:
            raise BadSample(f"unknown label '{values['label']}' (expected one of {', '.join(labels.names)})")
        media = self.inside(self.root, relative)
        kind = self.checked(media) or _media_kind(media)
        if kind is None:
            if not media.exists():
                raise BadSample(f"media {self.show(media)} not found")
            raise BadSample(f"cannot tell the media kind of '{media.name}' (a folder of frames, or one of "
                            f"{', '.join(VIDEO_EXTS + IMAGE_EXTS + AUDIO_EXTS)})")
        if kind == "frames":
            self.frame_folder(media)
        else:
            self.media_file(media)
        return {"sample_id": sample_id, "media_path": str(media), "media_kind": kind, "label": label,
                "label_name": labels.names[label], "labels": [label], **known}


def _media_kind(path: Path) -> str | None:
    if path.is_dir():
        return "frames"
    for kind, extensions in (("video", VIDEO_EXTS), ("image", IMAGE_EXTS), ("audio", AUDIO_EXTS)):
        if path.suffix.lower() in extensions:
            return kind
    return None
