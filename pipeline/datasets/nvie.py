"""USTC-NVIE: visible and thermal infrared faces, posed and spontaneous, six expressions, three illuminations.

The release is sent on request and its folder layout is not published; this adapter reads the layout of the posed
part as it is commonly distributed, with every level a folder name:

    <Posed|Spontaneous>/<Infrared|Visible>/<Front|Left|Right>/<subject>/<Expression>/<image>

(the illumination is the direction of the lamp; the expression folders hold the apex images, or a sequence ending at
the apex). Expressions: Anger, Disgust, Fear, Happiness, Sadness, Surprise, mapped by name to basic6. A copy arranged
without the illumination level is read with `illuminations = []`. The spontaneous part's labels come with the release
as evaluators' spreadsheets, which this adapter does not read: it reads that part only once its sequences are sorted
into expression folders the same way.

Protocol: every image of an expression folder is a sample (`last_frames = k` keeps the last k of a sequence);
10 subject-independent folds over the subjects of all chosen illuminations, so a subject is in one fold whatever the
lamp (see images.py). sample_id = `<part>/<modality>/<illumination>/<subject>/<Expression>/<image stem>`.

Thermal images: the visible-light face detectors rarely find a face in them; run `faces` with `no_face =
"center_crop"` (the images are face-centred) or on the Visible modality.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .base import DatasetError, register_adapter
from .images import ImageDataset


@register_adapter("nvie")
class NVIE(ImageDataset):
    label_set = "basic6"

    @dataclass(frozen=True)
    class Options:
        part: Literal["Posed", "Spontaneous"] = "Posed"
        modality: Literal["Infrared", "Visible"] = "Infrared"
        illuminations: tuple[str, ...] = ("Front", "Left", "Right")    # empty = no illumination level
        last_frames: int = 0                                            # 0 = every image of an expression folder
        folds: int = 10

        def __post_init__(self) -> None:
            if self.last_frames < 0 or self.folds < 1:
                raise ValueError("nvie options: last_frames must be >= 0 and folds >= 1")

    def parts(self) -> list[tuple[str, Path]]:
        """(sample id prefix, folder of subject folders) per chosen illumination."""
        base = f"{self.options.part}/{self.options.modality}"
        if not self.options.illuminations:
            return [(base, self.require_dir(base, "image folder"))]
        return [(f"{base}/{light}", self.require_dir(f"{base}/{light}", "image folder"))
                for light in self.options.illuminations]

    def annotation_files(self) -> list[Path]:
        # The folder names are the labels: there is no file to hash, but the folders must be there.
        self.parts()
        return []

    def rows(self) -> Iterator[dict[str, Any]]:
        parts = self.parts()
        if not any(p.is_dir() for _, folder in parts for p in folder.iterdir()):
            raise DatasetError(f"nvie: no subject folders in {', '.join(self.show(f) for _, f in parts)}")
        yield from self.expression_sequences(parts, self.options.last_frames, self.options.folds)
