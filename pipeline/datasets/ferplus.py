"""FER+: the FER2013 images relabelled by ten annotators each, majority-vote protocol, 8 classes.

Layout (the official FERPlus repository's, after its `generate_training_data.py` has written the FER2013 pixels out as
images): `FER2013Train/`, `FER2013Valid/`, `FER2013Test/`, each holding 48x48 grayscale PNGs `fer0000000.png` and a
`label.csv` without header, one line per image: `fer0032220.png,"(0, 0, 48, 48)",0,0,0,0,2,1,0,7,0,0` = image, face box,
then the vote counts for neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, not-a-face
(older copies have no box column). Folders map to splits train / val / test (Valid = FER2013 PublicTest, Test =
PrivateTest).

Label = the official "majority" mode (FERPlus `src/ferplus.py`): a single vote for an emotion is an outlier and is
dropped, then the emotion with more than half of the remaining votes wins. Images with no such majority (ties
included), or whose majority is unknown or not-a-face, are outside the protocol: no row, counted in `excluded` as
"no-majority", "unknown" or "not-face". Classes = ferplus8 (the vote-column order). sample_id = the image stem.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affectprep.labels import FERPLUS8, FERPLUS_VOTES

from .base import BadSample, DatasetError, csv_fields, register_adapter, text_lines
from .images import ImageDataset

SPLITS = (("train", "FER2013Train"), ("val", "FER2013Valid"), ("test", "FER2013Test"))
LABEL_FILE = "label.csv"


@register_adapter("ferplus")
class FERPlus(ImageDataset):
    label_set = "ferplus8"

    @dataclass(frozen=True)
    class Options:
        pass

    def annotation_files(self) -> list[Path]:
        files = [self.root / folder / LABEL_FILE for _, folder in SPLITS]
        missing = [self.show(f) for f in files if not f.is_file()]
        if missing:
            raise DatasetError(f"ferplus: annotation file(s) {', '.join(missing)} not found under {self.root}")
        return files

    def rows(self) -> Iterator[dict[str, Any]]:
        for (split, _), path in zip(SPLITS, self.annotation_files()):
            for line, text in text_lines(path):
                reason = _exclusion(text)
                if reason:
                    self.excluded[reason] += 1
                    continue
                yield self.attempt(path, line, lambda known: self._sample(text, split, path, line, known))

    def _sample(self, text: str, split: str, path: Path, line: int, known: dict[str, Any]) -> dict[str, Any]:
        name, counts = _split(text)
        known["split"] = split
        sample_id = self.claim(Path(name).stem, path, line, known)
        label = majority(_votes(counts))
        image = self.image_file(self.inside(path.parent, name))
        return {"sample_id": sample_id, "media_path": str(image), "media_kind": "image", "label": label,
                "label_name": FERPLUS8[label], "labels": [label], "split": split, "fold": 0}


def majority(votes: list[int]) -> int | None:
    """The index (in FERPLUS_VOTES) of the column with more than half of the votes once single votes are dropped."""
    kept = [v if v > 1 else 0 for v in votes]
    best = max(range(len(kept)), key=kept.__getitem__)
    return best if kept[best] > sum(kept) / 2 else None


def _exclusion(text: str) -> str | None:
    """Why the majority protocol leaves this line out, if it does. A line that does not parse is not left out: it
    fails."""
    try:
        winner = majority(_votes(_split(text)[1]))
    except BadSample:
        return None
    if winner is None:
        return "no-majority"
    return FERPLUS_VOTES[winner] if winner >= len(FERPLUS8) else None


def _split(text: str) -> tuple[str, list[str]]:
    """(image name, the ten vote fields) of one label.csv line, with or without the face-box column."""
    fields = [f.strip() for f in csv_fields(text)]
    if len(fields) not in (len(FERPLUS_VOTES) + 1, len(FERPLUS_VOTES) + 2):
        raise BadSample(f"expected an image name, an optional face box and {len(FERPLUS_VOTES)} vote counts, got "
                        f"{len(fields)} fields")
    if not fields[0] or Path(fields[0]).name != fields[0]:
        raise BadSample(f"image name '{fields[0]}' is not a file name")
    return fields[0], fields[-len(FERPLUS_VOTES):]


def _votes(counts: list[str]) -> list[int]:
    if not all(c.isdigit() for c in counts):
        raise BadSample(f"vote counts must be whole numbers, got {', '.join(counts)}")
    return [int(c) for c in counts]
