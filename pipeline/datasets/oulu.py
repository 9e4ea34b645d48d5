"""Oulu-CASIA NIR&VIS: six posed expressions, sequences from neutral to apex, 10 subject-independent folds.

Layout: `OriginalImg/<VL|NI>/<Strong|Weak|Dark>/<subject>/<Expression>/<frame>.jpeg` (e.g.
`OriginalImg/VL/Strong/P001/Anger/000.jpeg`); VL = visible light, NI = near infrared, and the lighting folder is the
illumination (normal, weak, dark). Expressions: Anger, Disgust, Fear, Happiness, Sadness, Surprise, mapped by name to
basic6 (Oulu-CASIA has no neutral class). The folders are the annotation; there is no label file. The cropped copy of
the release (`Preprocess Img`) has the same layout below it: option `media`.

Protocol: each sequence contributes its last `peak_frames` frames (3 in most papers), each an image sample with the
sequence's label; 10 subject-independent folds (see images.py). One modality and one lighting per index (options).
sample_id = `<modality>/<lighting>/<subject>/<Expression>/<frame>`, e.g. `VL/Strong/P001/Anger/017`.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .base import DatasetError, register_adapter
from .images import ImageDataset


@register_adapter("oulu")
class OuluCASIA(ImageDataset):
    label_set = "basic6"

    @dataclass(frozen=True)
    class Options:
        media: str = "OriginalImg"                          # holds VL/ and NI/; relative to the root or absolute
        modality: Literal["VL", "NI"] = "VL"
        lighting: Literal["Strong", "Weak", "Dark"] = "Strong"
        peak_frames: int = 3                                # last frames of each sequence; 0 = every frame
        folds: int = 10

        def __post_init__(self) -> None:
            if self.peak_frames < 0 or self.folds < 1:
                raise ValueError("oulu options: peak_frames must be >= 0 and folds >= 1")

    def sequences_folder(self) -> Path:
        relative = f"{self.options.media}/{self.options.modality}/{self.options.lighting}"
        return self.require_dir(relative, "image folder")

    def annotation_files(self) -> list[Path]:
        # The folder names are the labels: there is no file to hash, but the folder must be there.
        self.sequences_folder()
        return []

    def rows(self) -> Iterator[dict[str, Any]]:
        folder = self.sequences_folder()
        if not any(p.is_dir() for p in folder.iterdir()):
            raise DatasetError(f"oulu: no subject folders in {self.show(folder)}")
        prefix = f"{self.options.modality}/{self.options.lighting}"
        yield from self.expression_sequences([(prefix, folder)], self.options.peak_frames, self.options.folds)
