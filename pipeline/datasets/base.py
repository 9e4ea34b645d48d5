"""What every dataset adapter shares: the interface, the registry, index building and the per-sample checks.

An adapter reads a dataset's official annotation files and yields one `schema.INDEX` row per annotated sample.
Bad input never raises out of `rows()`: a row that cannot be accepted (malformed line, unknown label, missing or
empty media, a path escaping its folder, a duplicate id) becomes a row with status "failed" and an error naming the
annotation file and line. Only a problem with the whole dataset (a missing annotation file or folder, a wrong
option) raises: `DatasetError` or `ValueError`, with a one-line message.

Sample ids are unique within an index. A row whose id cannot be read, or repeats an earlier one, is kept under the
id `<annotation file>:<line>` so that nothing is dropped and every id still names one row.

Media checked before. Checking media costs a few system calls and a file opening per sample (half a minute at 300k
samples), so a rerun does not check again what an earlier index of the dataset found usable: `checked_media` maps
those media (path as the index stores it -> media kind), and the checks below (`inside`, `media_file`, `frame_folder`,
`find_clip`, an image's signature) take a path listed there as checked. A choice: a file deleted or damaged since
fails at the stage that reads it, as a recorded sample error, instead of at the index; a sample that failed here is
checked again on every run, so a clip added or repaired turns ok.
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from affectprep import schema
from affectprep.config import ConfigError, build_dataclass
from affectprep.labels import LabelSet, label_set

from ..media import IMAGE_EXTS

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")
AUDIO_EXTS = (".wav", ".flac")


class DatasetError(Exception):
    """The dataset as a whole cannot be read (missing annotation files, wrong folder). One line; CLI exit code 2."""


class BadSample(Exception):
    """One sample cannot be accepted. The message is fit for a person; the caller adds the file and line."""


class DatasetAdapter:
    kind: ClassVar[str]
    # Bump when the rows change for the same annotations and options: the index key changes with it, so stores
    # computed from the old rows are not reused (a changed row under the same key would keep its old frames).
    version: ClassVar[int] = 1
    label_set: ClassVar[str]          # a name from affectprep.labels; an adapter may refine it per instance
    Options: ClassVar[type]           # frozen dataclass, every field with a default

    def __init__(self, root: Path, options: Any):
        self.root = Path(root).resolve()
        self.options = options
        self.excluded: Counter[str] = Counter()   # samples left out by the dataset's protocol, by reason
        # sample id -> where it was first listed, as one int (file number << 32 | line): a tuple a sample costs
        # 20 MB at 300k samples, for a message only a duplicate needs.
        self._seen: dict[str, int] = {}
        self._sources: dict[Path, int] = {}
        self._resolved: dict[Path, str] = {}      # media base folder -> its resolved path
        self.checked_media: dict[str, str] = {}   # media path (as stored) -> kind, usable in an earlier index
        self._root_prefix = str(self.root).rstrip(os.sep) + os.sep
        self._base: tuple[Any, str] = (None, "")   # the last base folder `checked_path` was given, as text

    def labels(self) -> LabelSet:
        return label_set(self.label_set)

    def annotation_files(self) -> list[Path]:
        """Every file whose content determines the index. Raises DatasetError if the annotations are missing."""
        raise NotImplementedError

    def rows(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    # ---- helpers for subclasses ------------------------------------------------------------------------------------

    def show(self, path: Path) -> str:
        """A path as a person wants to read it in an error: relative to the dataset root when inside it."""
        if path == self.root:
            return "the dataset root"
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def require_file(self, relative: str) -> Path:
        path = self.root / relative
        if not path.is_file():
            raise DatasetError(f"{self.kind}: annotation file {relative} not found under {self.root}")
        return path

    def require_dir(self, relative: str, what: str = "annotation folder") -> Path:
        path = self.root / relative
        if not path.is_dir():
            raise DatasetError(f"{self.kind}: {what} {relative} not found under {self.root}")
        return path

    def media_folder(self, option: str) -> Path:
        """The folder a `media` option names (relative to the root, or absolute), which must exist."""
        path = self.root / option
        if not path.is_dir():
            raise DatasetError(f"{self.kind}: media folder {option} not found under {self.root} (option 'media')")
        return path

    def attempt(self, source: Path, line: int, make: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Run `make(known)` for one annotation line and turn a BadSample into a failed row.

        `make` records what it has established in `known` (the sample id once claimed, fold, subject, ...) so a
        failure after that point is reported under the sample's own id with those fields filled in.
        """
        known: dict[str, Any] = {}
        try:
            fields = make(known)
        except BadSample as e:
            where = f"{self.show(source)} line {line}"
            return failed_row(known.pop("sample_id", f"{self.show(source)}:{line}"), f"{where}: {e}", known)
        except OSError as e:  # e.g. permission denied while checking media: this sample only
            where = f"{self.show(source)} line {line}"
            return failed_row(known.pop("sample_id", f"{self.show(source)}:{line}"),
                              f"{where}: {e.strerror or e} ({e.filename})", known)
        return ok_row(fields)

    def claim(self, sample_id: str, source: Path, line: int, known: dict[str, Any]) -> str:
        """Register a sample id; a repeat is a BadSample. On success the id goes into `known`."""
        first = self._seen.get(sample_id)
        if first is not None:
            where = next(path for path, number in self._sources.items() if number == first >> 32)
            raise BadSample(f"duplicate sample id '{sample_id}' (first listed at {self.show(where)} line "
                            f"{first & 0xFFFFFFFF})")
        number = self._sources.setdefault(source, len(self._sources))
        self._seen[sample_id] = number << 32 | line
        known["sample_id"] = sample_id
        return sample_id

    def checked(self, path: str | Path) -> str | None:
        """The media kind of `path` if an earlier index found it usable (see the module docstring), else None."""
        if not self.checked_media:
            return None
        text = os.fspath(path)
        key = text[len(self._root_prefix):] if text.startswith(self._root_prefix) else text
        return self.checked_media.get(key if os.sep == "/" else key.replace(os.sep, "/"))

    def checked_path(self, base: Path, relative: str) -> str | None:
        """`base/relative` as a string if an earlier index found it usable (and it lies under `base` as written),
        else None: what an adapter of 300k images asks before `inside` and the checks (a Path per sample costs
        seconds). A path it returns resolved to itself before: no symlink, no `..` out of `base`."""
        if base is not self._base[0]:   # the same folder for every line: its text made once
            self._base = (base, os.fspath(base))
        text = self._base[1]
        lexical = os.path.normpath(os.path.join(text, relative))
        if not lexical.startswith(text.rstrip(os.sep) + os.sep):   # an earlier index's options had another base
            return None
        return lexical if self.checked(lexical) else None

    def inside(self, base: Path, relative: str) -> Path:
        """`base/relative`, resolved; a BadSample if it resolves outside `base` (`..`, absolute paths, symlinks)."""
        if (lexical := self.checked_path(base, relative)) is not None:
            return Path(lexical)
        base_resolved = self._resolved.get(base) or self._resolved.setdefault(base, str(base.resolve()))
        # os.path on strings: the same resolution as Path.resolve, a fraction of the cost per sample.
        path = os.path.realpath(os.path.join(base, relative))
        if not (path == base_resolved or path.startswith(base_resolved.rstrip(os.sep) + os.sep)):
            raise BadSample(f"path '{relative}' resolves outside {self.show(base)}")
        return Path(path)

    def media_file(self, path: Path) -> Path:
        """An existing, non-empty media file."""
        if self.checked(path):
            return path
        if not path.is_file():
            raise BadSample(f"media file {self.show(path)} not found")
        if path.stat().st_size == 0:
            raise BadSample(f"media file {self.show(path)} is empty (0 bytes)")
        return path

    def frame_folder(self, path: Path) -> Path:
        """An existing folder holding at least one image."""
        if self.checked(path):
            return path
        if not path.is_dir():
            raise BadSample(f"frame folder {self.show(path)} not found")
        with os.scandir(path) as entries:
            if not any(e.name.lower().endswith(IMAGE_EXTS) for e in entries):
                raise BadSample(f"frame folder {self.show(path)} holds no images")
        return path

    def find_clip(self, base: Path, names: list[str]) -> tuple[Path, str]:
        """A clip listed by name: a frame folder `base/<name>/` or a video `base/<name>[.ext]`.

        Tries each name in turn (e.g. "00001" then "1"): (resolved path, "frames" | "video").
        """
        candidates = [candidate for name in names for candidate in (name, *(name + ext for ext in VIDEO_EXTS))]
        for candidate in candidates:
            lexical = self.checked_path(base, candidate)
            if lexical is not None and (kind := self.checked(lexical)) in ("frames", "video"):
                return Path(lexical), kind
        for candidate in candidates:
            path = self.inside(base, candidate)
            if path.is_dir():
                return self.frame_folder(path), "frames"
            if path.suffix.lower() in VIDEO_EXTS and path.exists():
                return self.media_file(path), "video"
        raise BadSample(f"no video or frame folder named '{names[0]}' in {self.show(base)}")


# ---- rows --------------------------------------------------------------------------------------------------------

_EMPTY_ROW = {name: None for name in schema.INDEX.names}


def ok_row(fields: dict[str, Any]) -> dict[str, Any]:
    return {**_EMPTY_ROW, "frame_start": 0, "frame_end": -1, "label": -1, "fold": 0, **fields,
            "status": schema.STATUS_OK, "error": None}


def failed_row(sample_id: str, error: str, known: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**_EMPTY_ROW, **(known or {}), "sample_id": sample_id, "status": schema.STATUS_FAILED, "error": error}


def centred_window(position: int, window: int) -> tuple[int, int]:
    """[start, end) of `window` frames whose centre frame start + window // 2 is `position` (SSM Eqs. 4-5: the
    labelled frame is the centre of its clip). Near either end of the media the window reaches past it (start < 0
    or end > its length); the frames stage repeats the edge frame there rather than shift the window, which would
    put another frame at the centre."""
    start = position - window // 2
    return start, start + window


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of an annotation file."""
    for number, text in enumerate(read_text(path).splitlines(), start=1):
        if text.strip():
            yield number, text


def csv_fields(text: str) -> list[str]:
    """One CSV line's fields. Lines are parsed one by one so that a broken line (a NUL byte, a runaway quote)
    fails only its own sample; no annotation file here has quoted fields that span lines."""
    try:
        return next(csv.reader([text]), [])
    except csv.Error as e:
        raise BadSample(f"cannot parse the line as CSV: {e}") from None


def read_text(path: Path) -> str:
    """An annotation file as text (UTF-8, BOM tolerated; undecodable bytes become U+FFFD and then fail the row)."""
    try:
        return path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as e:
        raise DatasetError(f"cannot read annotation file {path}: {e.strerror}") from None


# ---- registry and index building ----------------------------------------------------------------------------------

ADAPTERS: dict[str, type[DatasetAdapter]] = {}


def register_adapter(kind: str) -> Callable[[type[DatasetAdapter]], type[DatasetAdapter]]:
    def register(cls: type[DatasetAdapter]) -> type[DatasetAdapter]:
        cls.kind = kind
        ADAPTERS[kind] = cls
        return cls
    return register


def options_for(kind: str) -> Any:
    """The default options of a dataset kind (what `affectprep init` writes)."""
    return _adapter_class(kind).Options()


def make_adapter(kind: str, root: Path, options: dict[str, Any] | None = None) -> DatasetAdapter:
    """An adapter with validated options: an unknown option or a bad value is a ValueError with a one-line reason."""
    cls = _adapter_class(kind)
    try:
        parsed = build_dataclass(cls.Options, dict(options or {}), f"{kind} options")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if not Path(root).is_dir():
        raise DatasetError(f"{kind}: dataset root {root} is not a folder")
    return cls(Path(root), parsed)


def build_index(kind: str, root: Path, options: dict[str, Any] | None = None) -> pa.Table:
    """Read a dataset's annotations into an index table (schema.INDEX).

    Metadata: the label set's name and names, and the samples the dataset's protocol excludes, by reason.
    """
    return index_table(make_adapter(kind, root, options))


def index_table(adapter: DatasetAdapter) -> pa.Table:
    """The index rows, media paths relative to the dataset root: a project moved or copied elsewhere keeps its
    index (and so every store after it)."""
    # Made a chunk at a time: 300k row dicts at once would cost a gigabyte.
    chunks, rows = [], []
    for row in adapter.rows():
        rows.append(_relative_media(row, adapter.root))
        if len(rows) == 8192:
            chunks.append(pa.Table.from_pylist(rows, schema=schema.INDEX))
            rows = []
    chunks.append(pa.Table.from_pylist(rows, schema=schema.INDEX))
    labels = adapter.labels()
    metadata = {
        **schema.INDEX.metadata,
        b"affectprep.kind": adapter.kind.encode(),
        b"affectprep.label_set": labels.name.encode(),
        b"affectprep.label_names": json.dumps(list(labels.names)).encode(),
        b"affectprep.excluded": json.dumps(dict(sorted(adapter.excluded.items()))).encode(),
    }
    return pa.concat_tables(chunks).replace_schema_metadata(metadata)


def _relative_media(row: dict[str, Any], root: Path) -> dict[str, Any]:
    """The row (an adapter's own, changed in place) with its media path relative to `root` when inside it."""
    path = row.get("media_path")
    if not path:
        return row
    text, base = str(path), str(root).rstrip(os.sep)
    if text.startswith(base + os.sep):   # Path.is_relative_to is lexical too: the same test on the string
        relative = text[len(base) + 1:]
        row["media_path"] = relative if os.sep == "/" else Path(relative).as_posix()
    elif Path(path).is_relative_to(root):
        row["media_path"] = Path(path).relative_to(root).as_posix()
    return row


def _adapter_class(kind: str) -> type[DatasetAdapter]:
    try:
        return ADAPTERS[kind]
    except KeyError:
        raise ValueError(f"unknown dataset kind '{kind}' (known: {', '.join(sorted(ADAPTERS))})") from None
