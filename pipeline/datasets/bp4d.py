"""BP4D(-Spontaneous): frame-level occurrence of 12 AUs, 41 subjects, 3 subject folds.

Layout: `AUCoding/AU_OCC/<subject>_<task>.csv` (e.g. F001_T1.csv). The first column is the frame number, the others
are AU numbers (`1`, `2`, ... or `AU1`, ...); values 0/1, and 9 = not coded (stored as NaN). Images:
`Sequences/<subject>/<task>/<number>.jpg` with mixed zero padding. In the release the image numbers start at 0 while
the AU frame numbers start at 1, so image = frame - 1 (option `image_offset`, default -1).

A sample is one labelled frame (every `frame_stride`-th one): media = the sequence's frame folder, the window =
`window` frames centred on it (as positions in the folder's frame order; near the sequence's ends it reaches past
them and the edge frames repeat, so the labelled frame stays the centre), `au` = the bp4d12 vector of that frame.
sample_id `<subject>_<task>_<frame>`.

Folds: the 3 subject folds of JAA-Net / ME-GraphAU, numbered as ME-GraphAU's list files number their test sets
(fold 1 tests the third part, fold 3 the first). A subject outside those lists (a BP4D+ subject) gets fold 0.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affectprep.labels import BP4D_AUS

from ..media import frame_images
from .base import (BadSample, DatasetAdapter, DatasetError, centred_window, csv_fields, failed_row,
                   register_adapter, text_lines)

_PARTS = (
    ("F001", "M007", "F018", "F008", "F002", "M004", "F010", "F009", "M012", "M001", "F016", "M014", "F023", "M008"),
    ("M011", "F003", "M010", "M002", "F005", "F022", "M018", "M017", "F013", "M016", "F020", "F011", "M013", "M005"),
    ("F007", "F015", "F006", "F019", "M006", "M009", "F012", "M003", "F004", "F021", "F017", "M015", "F014"),
)
FOLDS = {subject: 3 - part for part, subjects in enumerate(_PARTS) for subject in subjects}
OCCURRENCE = {"0": 0.0, "1": 1.0, "9": math.nan}


@register_adapter("bp4d")
class BP4D(DatasetAdapter):
    label_set = "bp4d12"
    version = 2     # 2: windows near the ends stay centred on the labelled frame (were shifted inside)

    @dataclass(frozen=True)
    class Options:
        media: str = "Sequences"            # <subject>/<task>/ frame folders; relative to the root or absolute
        labels: str = "AUCoding/AU_OCC"     # folder of <subject>_<task>.csv occurrence files
        window: int = 16                    # frames per sample, centred on the labelled frame
        frame_stride: int = 1               # take every n-th labelled frame
        image_offset: int = -1              # image number = AU frame number + image_offset

        def __post_init__(self) -> None:
            if self.window < 1 or self.frame_stride < 1:
                raise ValueError("bp4d options: window and frame_stride must be >= 1")

    def annotation_files(self) -> list[Path]:
        files = sorted(self.require_dir(self.options.labels).glob("*.csv"))
        if not files:
            raise DatasetError(f"bp4d: no <subject>_<task>.csv files in {self.options.labels} under {self.root}")
        return files

    def rows(self) -> Iterator[dict[str, Any]]:
        files = self.annotation_files()
        media = self.media_folder(self.options.media)
        for path in files:
            yield from self._sequence(path, media)

    def _sequence(self, path: Path, media: Path) -> Iterator[dict[str, Any]]:
        match = re.fullmatch(r"(.+)_(T\d+)", path.stem)
        lines = list(text_lines(path))
        try:
            columns = _au_columns(csv_fields(lines[0][1])) if lines else {}
        except BadSample:
            columns = {}
        missing = [a for a in BP4D_AUS if a not in columns]
        if match is None or missing:
            why = ("file name is not <subject>_<task>.csv" if match is None else
                   f"header has no column for AU {', '.join(map(str, missing))}")
            yield failed_row(f"{self.show(path)}:1", f"{self.show(path)} line 1: {why}")
            return
        subject, task = match.groups()
        sequence = self._frames_of(media, subject, task)
        for line, text in lines[1::self.options.frame_stride]:
            yield self.attempt(path, line, lambda known: self._frame(
                csv_fields(text), columns, subject, task, sequence, path, line, known))

    def _frames_of(self, media: Path, subject: str, task: str) -> _Sequence:
        """The sequence's frame folder and image numbers, or why it cannot be used (reported on each frame)."""
        if not _plain(subject, task):
            return _Sequence(error=f"subject/task '{subject}/{task}' is not a plain folder name")
        try:
            folder = self.inside(media, f"{subject}/{task}")
        except BadSample as e:
            return _Sequence(error=str(e))
        images = frame_images(folder) if folder.is_dir() else []
        if not images:
            return _Sequence(error=f"frame folder {self.show(folder)} not found or holds no images")
        return _Sequence(folder, len(images), {int(p.stem): i for i, p in enumerate(images) if p.stem.isdigit()})

    def _frame(self, fields: list[str], columns: dict[int, int], subject: str, task: str, sequence: _Sequence,
               path: Path, line: int, known: dict[str, Any]) -> dict[str, Any]:
        if len(fields) <= max(columns.values()):
            raise BadSample(f"expected at least {max(columns.values()) + 1} columns, got {len(fields)}")
        frame = fields[0].strip()
        if not frame.isdigit():
            raise BadSample(f"frame number '{frame}' is not an integer")
        known.update(subject=subject, fold=FOLDS.get(subject, 0))
        sample_id = self.claim(f"{subject}_{task}_{int(frame)}", path, line, known)
        au = []
        for a in BP4D_AUS:
            value = fields[columns[a]].strip()
            if value not in OCCURRENCE:
                raise BadSample(f"AU{a} value '{value}' (expected 0, 1 or 9 = not coded)")
            au.append(OCCURRENCE[value])
        if sequence.error:
            raise BadSample(sequence.error)
        image = int(frame) + self.options.image_offset
        if image not in sequence.positions:
            raise BadSample(f"frame {int(frame)}: no image numbered {image} in {self.show(sequence.folder)}")
        start, end = centred_window(sequence.positions[image], self.options.window)
        return {"sample_id": sample_id, "media_path": str(sequence.folder), "media_kind": "frames",
                "frame_start": start, "frame_end": end, "au": au, "subject": subject, "fold": FOLDS.get(subject, 0)}


def _au_columns(header: list[str]) -> dict[int, int]:
    """AU number -> column index, from a header like `0,1,2,4,...` or `Frame,AU1,AU2,...` (column 0 is the frame)."""
    columns = {}
    for i, name in enumerate(header[1:], start=1):
        number = name.strip().upper().removeprefix("AU")
        if number.isdigit():
            columns[int(number)] = i
    return columns


@dataclass
class _Sequence:
    folder: Path | None = None
    num_images: int = 0
    positions: dict[int, int] = field(default_factory=dict)    # image number -> position in frame order
    error: str | None = None


def _plain(*names: str) -> bool:
    return all(re.fullmatch(r"[A-Za-z0-9]+", n) for n in names)
