"""DISFA: frame-level intensity (0..5) of 8 AUs, 27 subjects, 3 subject folds.

Layout: `ActionUnit_Labels/SN001/SN001_au1.txt` with lines `frame,intensity` (frames numbered from 1, one line per
video frame); videos `Videos_LeftCamera/LeftVideoSN001_comp.avi` (for the right camera set `media` and `video_name`).
Occurrence = intensity >= `threshold` (2, the usual rule). A frame missing from one AU's file has that AU NaN.

A sample is one labelled frame (every `frame_stride`-th): media = the subject's video, the window = `window` frames
centred on it (video frame index = frame number - 1; near the video's ends the edge frames repeat, so the labelled
frame stays the centre), `au` = the disfa8 vector. sample_id `<subject>_<frame>`.

Folds: the 3 subject folds of JAA-Net / ME-GraphAU, numbered as ME-GraphAU's list files number their test sets
(fold 1 tests the third part, fold 3 the first). A subject outside those lists gets fold 0.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affectprep.labels import DISFA_AUS

from .base import BadSample, DatasetAdapter, DatasetError, centred_window, failed_row, register_adapter, text_lines

_PARTS = (
    ("SN002", "SN010", "SN001", "SN026", "SN027", "SN032", "SN030", "SN009", "SN016"),
    ("SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024"),
    ("SN003", "SN029", "SN023", "SN025", "SN008", "SN005", "SN007", "SN017", "SN004"),
)
FOLDS = {subject: 3 - part for part, subjects in enumerate(_PARTS) for subject in subjects}


@register_adapter("disfa")
class DISFA(DatasetAdapter):
    label_set = "disfa8"
    version = 2     # 2: windows near the ends stay centred on the labelled frame (were shifted inside)

    @dataclass(frozen=True)
    class Options:
        media: str = "Videos_LeftCamera"                # folder of the videos; relative to the root or absolute
        video_name: str = "LeftVideo{subject}_comp.avi"
        labels: str = "ActionUnit_Labels"               # folder of <subject>/<subject>_au<N>.txt
        threshold: int = 2                              # occurrence = intensity >= threshold
        window: int = 16                                # frames per sample, centred on the labelled frame
        frame_stride: int = 1                           # take every n-th labelled frame

        def __post_init__(self) -> None:
            if self.window < 1 or self.frame_stride < 1:
                raise ValueError("disfa options: window and frame_stride must be >= 1")
            if not 1 <= self.threshold <= 5:
                raise ValueError("disfa options: threshold must be an intensity in 1..5")
            try:
                named = self.video_name.format(subject="SN001") != self.video_name
            except (KeyError, IndexError, ValueError):
                named = False
            if not named:
                raise ValueError("disfa options: video_name must contain {subject} and no other {field}")

    def subjects(self) -> list[Path]:
        folder = self.require_dir(self.options.labels)
        subjects = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subjects:
            raise DatasetError(f"disfa: no subject folders in {self.options.labels} under {self.root}")
        return subjects

    def annotation_files(self) -> list[Path]:
        return [f for s in self.subjects() for a in DISFA_AUS if (f := _au_file(s, a)).is_file()]

    def rows(self) -> Iterator[dict[str, Any]]:
        subjects = self.subjects()
        media = self.media_folder(self.options.media)
        for folder in subjects:
            yield from self._subject(folder, media)

    def _subject(self, folder: Path, media: Path) -> Iterator[dict[str, Any]]:
        subject = folder.name
        intensities: dict[int, dict[int, int]] = {}     # frame -> AU -> intensity
        where: dict[int, tuple[Path, int]] = {}          # frame -> its first annotation line, for messages
        for au in DISFA_AUS:
            path = _au_file(folder, au)
            if not path.is_file():
                yield failed_row(subject, f"{self.show(path)} not found: no frame of {subject} can be labelled",
                                 {"subject": subject, "fold": FOLDS.get(subject, 0)})
                return
            for line, text in text_lines(path):
                parsed = _intensity_line(text)
                if isinstance(parsed, str):
                    yield failed_row(f"{self.show(path)}:{line}", f"{self.show(path)} line {line}: {parsed}")
                    continue
                frame, value = parsed
                if au in intensities.get(frame, {}):
                    yield failed_row(f"{self.show(path)}:{line}",
                                     f"{self.show(path)} line {line}: frame {frame} is listed twice")
                    continue
                intensities.setdefault(frame, {})[au] = value
                where.setdefault(frame, (path, line))
        video_error = None
        try:
            video = self.media_file(self.inside(media, self.options.video_name.format(subject=subject)))
        except BadSample as e:
            video, video_error = None, str(e)
        for frame in sorted(intensities)[::self.options.frame_stride]:
            path, line = where[frame]
            yield self.attempt(path, line, lambda known: self._frame(
                subject, frame, intensities[frame], video, video_error, path, line, known))

    def _frame(self, subject: str, frame: int, values: dict[int, int], video: Path | None, video_error: str | None,
               path: Path, line: int, known: dict[str, Any]) -> dict[str, Any]:
        known.update(subject=subject, fold=FOLDS.get(subject, 0))
        sample_id = self.claim(f"{subject}_{frame}", path, line, known)
        if video is None:
            raise BadSample(video_error)
        au = [float(values[a] >= self.options.threshold) if a in values else math.nan for a in DISFA_AUS]
        start, end = centred_window(frame - 1, self.options.window)
        return {"sample_id": sample_id, "media_path": str(video), "media_kind": "video", "frame_start": start,
                "frame_end": end, "au": au, "subject": subject, "fold": FOLDS.get(subject, 0)}


def _au_file(subject_folder: Path, au: int) -> Path:
    return subject_folder / f"{subject_folder.name}_au{au}.txt"


def _intensity_line(text: str) -> tuple[int, int] | str:
    """`frame,intensity` -> (frame, intensity), or what is wrong with the line."""
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if match is None:
        return f"expected 'frame,intensity', got '{text.strip()}'"
    frame, value = int(match[1]), int(match[2])
    if frame < 1:
        return f"frame number {frame} (frames are numbered from 1)"
    if value > 5:
        return f"intensity {value} (expected 0..5)"
    return frame, value
