"""What the still-image adapters share: a cheap check that a file is an image, and the expression-folder layout of
posed sequence datasets (Oulu-CASIA, NVIE).

The check reads a file's first bytes only (the JPEG, PNG or BMP signature): decoding all of AffectNet's 290k images
at index time would cost far more than the index itself. Random bytes, an HTML error page saved as .jpg and an empty
file fail here, as index rows; a file with a valid signature that is damaged further in fails in the `frames` stage,
as a damaged video does.

Expression-folder layout: `<base>/<subject>/<Expression>/<frames>`, one folder per posed sequence, frames named so
that their last number gives their order (`000.jpeg`, `001.jpeg`, ...). A sequence runs from neutral to the apex, so
the usual protocol keeps its last k frames, each as one image sample with the sequence's label. Folds are subject
independent: the subjects sorted by name and cut into `folds` contiguous, near-equal groups (fold = group + 1).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from affectprep.labels import BASIC6, UnknownLabel, basic6_index

from ..media import frame_images
from .base import BadSample, DatasetAdapter, failed_row, ok_row

SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")


class ImageDataset(DatasetAdapter):
    def image_file(self, path: Path) -> Path:
        """An existing, non-empty file that starts like a JPEG, PNG or BMP image."""
        if self.checked(path):
            return path
        self.media_file(path)
        with open(path, "rb") as f:
            head = f.read(8)
        if not head.startswith(SIGNATURES):
            raise BadSample(f"{self.show(path)} is not a JPEG, PNG or BMP image")
        return path

    def expression_sequences(self, parts: list[tuple[str, Path]], last_frames: int,
                             folds: int) -> Iterator[dict[str, Any]]:
        """Index rows of every sequence under each `(id prefix, base folder)`; labels are basic6 by folder name.

        sample_id = `<prefix>/<subject>/<Expression>/<frame stem>`. A folder with an unknown expression name or
        no images becomes one failed row named after the folder.
        """
        subjects = {part: _folders(base) for part, base in parts}
        names = sorted({s.name for found in subjects.values() for s in found})
        fold_of = {name: i * folds // len(names) + 1 for i, name in enumerate(names)}
        for prefix, _ in parts:
            for subject in subjects[prefix]:
                fields = {"subject": subject.name, "fold": fold_of[subject.name]}
                for folder in _folders(subject):
                    sequence = f"{prefix}/{subject.name}/{folder.name}"
                    try:
                        label = basic6_index(folder.name)
                        frames = frame_images(folder)
                        if not frames:
                            raise BadSample("the folder holds no images")
                    except (BadSample, UnknownLabel) as e:
                        yield failed_row(sequence, f"{self.show(folder)}: {e}", fields)
                        continue
                    for frame in frames[-last_frames if last_frames else 0:]:
                        sample_id = f"{sequence}/{frame.stem}"
                        try:
                            self.image_file(frame)
                        except BadSample as e:
                            yield failed_row(sample_id, str(e), {**fields, "label": label})
                            continue
                        yield ok_row({"sample_id": sample_id, "media_path": str(frame), "media_kind": "image",
                                      "label": label, "label_name": BASIC6[label], "labels": [label], **fields})


def _folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
