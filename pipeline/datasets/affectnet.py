"""AffectNet (manually annotated part), 7 or 8 expression classes.

Layout: `Manually_Annotated_file_lists/training.csv` and `validation.csv`, header
`subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal`, e.g.
`689/737db2483489148d783ef278f43f486c0a97e140fc4b6b61b84363ca.jpg,134,134,899,899,181.64;530.91;...,1,0.785714,-0.055`;
images `Manually_Annotated_Images/<subDirectory_filePath>`. Columns are found by header name.

Expression codes 0..10 = Neutral, Happy, Sad, Surprise, Fear, Disgust, Anger, Contempt, None, Uncertain, No-Face.
8..10 are outside every protocol, and contempt is outside the 7-class one: those lines get no row and are counted in
`excluded` by name. `classes = 7` maps to basic7 by name, `classes = 8` to affectnet8 (AffectNet's own order). The
test set of the papers is the official validation set (AffectNet's test set is not released): training.csv = split
"train", validation.csv = split "test". sample_id = subDirectory_filePath.

The csv's face box and 68 landmarks are not carried into the index (it has no column for them); the faces stage
detects the face again.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from affectprep.labels import AFFECTNET_EXCLUDED, UnknownLabel, affectnet_index, label_set

from .base import BadSample, DatasetError, csv_fields, register_adapter, text_lines
from .images import ImageDataset

SPLITS = (("train", "training.csv"), ("test", "validation.csv"))
PATH_COLUMN, LABEL_COLUMN = "subDirectory_filePath", "expression"
CONTEMPT = "7"


@register_adapter("affectnet")
class AffectNet(ImageDataset):
    label_set = "basic7"

    @dataclass(frozen=True)
    class Options:
        classes: Literal[7, 8] = 7
        annotations: str = "Manually_Annotated_file_lists"     # holds training.csv and validation.csv
        media: str = "Manually_Annotated_Images"              # relative to the root or absolute

    def __init__(self, root: Path, options: Any):
        super().__init__(root, options)
        self.label_set = "affectnet8" if options.classes == 8 else "basic7"

    def annotation_files(self) -> list[Path]:
        return [self.require_file(f"{self.options.annotations}/{name}") for _, name in SPLITS]

    def rows(self) -> Iterator[dict[str, Any]]:
        files = self.annotation_files()
        media = self.media_folder(self.options.media)
        for (split, _), path in zip(SPLITS, files):
            lines = text_lines(path)
            header = _header(next(lines, (0, ""))[1])
            missing = [c for c in (PATH_COLUMN, LABEL_COLUMN) if c not in header]
            if missing:
                raise DatasetError(f"affectnet: {self.show(path)} has no column {' or '.join(missing)} in its "
                                   f"header line")
            columns = header.index(PATH_COLUMN), header.index(LABEL_COLUMN)
            for line, text in lines:
                reason = self._exclusion(text, columns[1])
                if reason:
                    self.excluded[reason] += 1
                    continue
                yield self.attempt(path, line, lambda known: self._sample(
                    text, len(header), columns, split, media, path, line, known))

    def _exclusion(self, text: str, column: int) -> str | None:
        """Why the protocol leaves this line out, if it does. A line that does not parse is not left out: it fails."""
        try:
            fields = csv_fields(text)
        except BadSample:
            return None
        code = fields[column].strip() if len(fields) > column else None
        if code == CONTEMPT and self.options.classes == 7:
            return "contempt"
        return AFFECTNET_EXCLUDED.get(code)

    def _sample(self, text: str, width: int, columns: tuple[int, int], split: str, media: Path, path: Path,
                line: int, known: dict[str, Any]) -> dict[str, Any]:
        fields = csv_fields(text)
        if len(fields) != width:
            raise BadSample(f"expected {width} columns as in the header, got {len(fields)}")
        relative, code = fields[columns[0]].strip(), fields[columns[1]].strip()
        known["split"] = split
        sample_id = self.claim(relative, path, line, known)
        try:
            label = affectnet_index(code, self.options.classes)
        except UnknownLabel as e:
            raise BadSample(str(e)) from None
        image = self.checked_path(media, relative) or str(self.image_file(self.inside(media, relative)))
        return {"sample_id": sample_id, "media_path": image, "media_kind": "image", "label": label,
                "label_name": label_set(self.label_set).names[label], "labels": [label], "split": split, "fold": 0}


def _header(text: str) -> list[str]:
    try:
        return [name.strip() for name in csv_fields(text)]
    except BadSample:
        return []
