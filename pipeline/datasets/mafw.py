"""MAFW: 5-fold single-label (11 classes) or compound (43 classes) task, with or without descriptive captions.

Layout: `<splits>/{single,compound}/{no,with}_caption[_new]/set_N/{train,test}.txt`. Releases spell the folders two
ways, `Train_Test_Set/.../no_caption_new` and `Train & Test Set/.../no_caption`; option `splits` names the folder
holding set_1..set_5, empty = whichever of the two is present. The test files partition the clips, so they alone
determine each sample and its fold.

Rows: no_caption `03747.mp4 anger`; with_caption `clip<TAB>label<TAB>Chinese caption<TAB>English caption` (the
English caption goes into `transcript`). Compound labels are MAFW names joined by `_` (`anger_disgust`); the compound
split also lists single-label clips. task="single": label = mafw11 index. task="compound": label = mafw43 index and
`labels` = the mafw11 indices of its parts. The captioned files are not always UTF-8 (the Chinese text is in a
legacy encoding), so each line falls back to GB18030.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from affectprep.labels import MAFW11, MAFW43, UnknownLabel, mafw_compound, mafw_index

from .base import BadSample, DatasetAdapter, DatasetError, register_adapter

LAYOUTS = ("Train_Test_Set/{task}/{captions}_caption_new", "Train & Test Set/{task}/{captions}_caption")
FOLDS = 5


@register_adapter("mafw")
class MAFW(DatasetAdapter):
    label_set = "mafw11"

    @dataclass(frozen=True)
    class Options:
        task: Literal["single", "compound"] = "single"
        captions: Literal["no", "with"] = "no"
        media: str = "data/clips"      # videos <clip>.mp4 or frame folders <clip>/; relative to the root or absolute
        splits: str = ""               # folder holding set_1..set_5; empty = the release layout that is present

    def __init__(self, root: Path, options: Any):
        super().__init__(root, options)
        self.label_set = "mafw43" if options.task == "compound" else "mafw11"

    def split_folder(self) -> Path:
        if self.options.splits:
            return self.require_dir(self.options.splits)
        layouts = [layout.format(task=self.options.task, captions=self.options.captions) for layout in LAYOUTS]
        for layout in layouts:
            if (self.root / layout).is_dir():
                return self.root / layout
        raise DatasetError(f"mafw: annotation folder {' or '.join(layouts)} not found under {self.root}")

    def annotation_files(self) -> list[Path]:
        folder = self.split_folder()
        files = [folder / f"set_{fold}" / "test.txt" for fold in range(1, FOLDS + 1)]
        missing = [self.show(f) for f in files if not f.is_file()]
        if missing:
            raise DatasetError(f"mafw: annotation file(s) {', '.join(missing)} not found")
        return files

    def rows(self) -> Iterator[dict[str, Any]]:
        files = self.annotation_files()
        media = self.media_folder(self.options.media)
        for fold, path in enumerate(files, start=1):
            for line, text in enumerate(_decoded_lines(path), start=1):
                if not text.strip():
                    continue
                yield self.attempt(path, line, lambda known: self._sample(text, fold, media, path, line, known))

    def _sample(self, text: str, fold: int, media: Path, path: Path, line: int,
                known: dict[str, Any]) -> dict[str, Any]:
        if self.options.captions == "with":
            fields = text.rstrip("\r\n").split("\t")
            while fields and not fields[-1].strip():
                fields.pop()
            if len(fields) != 4:
                raise BadSample(f"expected 4 tab-separated fields (clip, label, Chinese caption, English caption), "
                                f"got {len(fields)}")
            clip, name, caption = fields[0].strip(), fields[1].strip(), fields[3].strip()
        else:
            fields = text.split()
            if len(fields) != 2:
                raise BadSample(f"expected 2 fields (clip label), got {len(fields)}")
            (clip, name), caption = fields, None
        known["fold"] = fold
        sample_id = self.claim(Path(clip).stem, path, line, known)
        try:
            if self.options.task == "compound":
                label, parts = mafw_compound(name)
                label_name = MAFW43[label]
            else:
                label = mafw_index(name)
                parts, label_name = (label,), MAFW11[label]
        except UnknownLabel as e:
            raise BadSample(str(e)) from None
        media_path, kind = self.find_clip(media, [clip, sample_id])
        return {"sample_id": sample_id, "media_path": str(media_path), "media_kind": kind, "label": label,
                "label_name": label_name, "labels": list(parts), "fold": fold, "transcript": caption or None}


def _decoded_lines(path: Path) -> Iterator[str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read annotation file {path}: {e.strerror}") from None
    for raw in data.splitlines():
        try:
            yield raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            yield raw.decode("gb18030", errors="replace")
