"""Parquet stores: one folder per (dataset, stage, cache key), holding immutable part files.

    <cache>/<dataset>/<stage>/<key>/
        config.json           the fully resolved config and input keys that produced this key
        part-<ns>-<host>-<pid>-<rand>.parquet    rows, written by whoever computed them (a worker, or the client)
        _status.parquet       the status index: sample id -> status, input digest, part and row group holding
                              its newest row, and the names of the parts it covers (a cache of the parts)
        .lock                 held (flock) by the run writing here

Each part file is written to a temporary name (`.part-….tmp`, never read as data), fsynced and renamed, so a reader
never sees half a file and a kill loses only the rows not yet renamed. A sample is done once a part holds a row
for it; if a sample is written again (a retried failure, a compaction), the row in the newest part wins (part names
sort by time; a run passes `not_before_ns` so its parts sort after every part that existed when it started,
whatever the writers' clocks say), so every sample reads back exactly once.

Several writers, several hosts. The client of a run holds `.lock` (flock, dropped by the kernel when it dies) on
every store it writes; its Dask tasks, on any host that sees the same filesystem, write their own parts with unique
names (host, pid, random) and return to the client only the part's name, the sample ids in it, their statuses and
errors. The completion record is the parts themselves: the status index is only a cache of them. A part written by
a task whose result never reached the client (the client was killed, the worker died between the rename and its
reply, Dask ran the task again elsewhere) is complete, valid data for this key: the next reader finds it in the
directory listing, not in the index, reads its small columns and merges it (newest wins), and the next lock holder
saves the merged index. Its samples are not redone; a sample written twice reads back once.

The status index is written only by the lock holder (read-only commands write nothing), atomically, and not for
a handful of small parts added since it was written (readers merge those in milliseconds). A reader
checks it against the directory listing: parts it does not cover are merged in; a part it covers that is gone
(compacted, quarantined) or an unreadable index means it is rebuilt from the parts. So an index deleted, stale, or
left behind by a killed run always reads back what the parts say.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from affectprep import schema as S


CORRUPT_SUFFIX = ".corrupt"
INDEX_FILE = "_status.parquet"
INDEX_VERSION = "1"
# Parts this process quarantined, (new path, reason), for the command to report at its end.
QUARANTINED: list[tuple[Path, str]] = []

# A row group holds this many rows, or ~64 MB, whichever comes first: large enough that a scan is a few big reads,
# small enough that reading one sample (by the index's row group) reads little.
GROUP_ROWS = 4096
GROUP_BYTES = 64 << 20
# A store with more small parts than this is compacted by the run that wrote them. A part is small when it holds
# fewer rows than a row group should and under a quarter of its bytes: a run's tasks write parts of up to 1024
# rows, which for frame indices or captions is a few kilobytes (a loader reading by ids pays per row group, so
# 10k samples in 10 parts read at half the speed of one part), while 1024 face crops are already a row group worth
# its read. Merging small parts rewrites little, so a run does it as soon as a handful have gathered.
COMPACT_PARTS = 8
SMALL_PART_BYTES = GROUP_BYTES // 4

_INDEX_SCHEMA = pa.schema([pa.field("sample_id", pa.string()), pa.field("status", pa.string()),
                           pa.field("input_digest", pa.string()), pa.field("part", pa.string()),
                           pa.field("row_group", pa.int32())])


class StoreLocked(Exception):
    """Another run is writing this store."""


class SchemaMismatch(Exception):
    """A part file was written by an incompatible schema version."""


@dataclass
class PartSummary:
    """What the client needs to know of a part a worker wrote: its name and, in file order, the ids, statuses
    and row-group sizes (and the error of each failed sample). A few bytes per sample."""
    name: str
    ids: list[str]
    statuses: list[str]
    group_rows: list[int]
    errors: dict[str, str] = field(default_factory=dict)
    digests: list[str | None] | None = None   # left out by workers: the client sent them


@dataclass
class _Index:
    parts: set[str]                                            # part names it covers
    rows: dict[str, tuple[str, str | None, str, int]]          # sid -> (status, digest, part, row group)
    saved: bool = False                                         # what the index file on disk holds
    on_disk: frozenset[str] | None = None                       # the parts the index file covers, if one does
    _winners: Counter | None = None                             # (part, row group) -> rows it holds that win

    def winners(self, part: str, group: int) -> int:
        """How many samples' newest rows the row group holds (all its rows, unless rewritten since)."""
        if self._winners is None:
            self._winners = Counter((row[2], row[3]) for row in self.rows.values())
        return self._winners[(part, group)]


class Store:
    def __init__(self, cache: Path, dataset: str, stage: str, key: str):
        self.cache, self.dataset, self.stage, self.key = Path(cache), dataset, stage, key
        self.path = self.cache / dataset / stage / key
        self.schema = S.schema_for(stage)
        self._index: _Index | None = None
        self._locked = False
        self._files: dict[str, pq.ParquetFile] = {}   # open parts (immutable), so a loader's reads skip the footer

    def __repr__(self) -> str:
        return f"Store({self.dataset}/{self.stage}/{self.key})"

    # ---- writing -------------------------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writer lock. flock is released by the kernel when the holder dies, even by SIGKILL. On the
        way out the holder saves the status index."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise StoreLocked(f"{self} is being written by {holder}; wait for that run to finish") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            self._remove_orphans()
            self._locked = True
            try:
                yield
            finally:
                try:
                    self.save_index()
                except OSError:   # a full or read-only disk: the parts are the record, the index only a cache
                    pass
                self._locked = False
        finally:
            os.close(fd)

    def _remove_orphans(self) -> None:
        """Temporary files of a writer that was killed before its rename. Only the lock holder's run writes here
        (its own tasks, which start after this), so whatever temporary file exists when the lock is taken belongs
        to no one."""
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.path / "config.json", json.dumps(config, indent=2, sort_keys=True).encode())

    def read_config(self) -> dict[str, Any] | None:
        """What config.json says; None when it is missing or unreadable (a truncated copy): it is a record of what
        made the store, written again by every run that writes the store, never needed to read the rows."""
        try:
            return json.loads((self.path / "config.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def write(self, rows: list[dict[str, Any]] | pa.Table, metadata: dict[str, str] | None = None,
              not_before_ns: int = 0) -> Path | None:
        """Append rows as one new part file, atomically. Returns its path (None for no rows). Safe to call from
        any process (a worker): the name is unique, and the lock holder's index learns of the part from
        `record()` or from the directory listing."""
        summary = self.write_part(rows, metadata, not_before_ns)
        if summary is None:
            return None
        self.record(summary)
        return self.path / summary.name

    def write_part(self, rows: list[dict[str, Any]] | pa.Table, metadata: dict[str, str] | None = None,
                   not_before_ns: int = 0) -> PartSummary | None:
        """Write a part and describe it, without touching the index (what a worker does)."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=self.schema)
        if table.num_rows == 0:
            return None
        if metadata:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   **{k.encode(): v.encode() for k, v in metadata.items()}})
        self.path.mkdir(parents=True, exist_ok=True)
        name = _part_name(not_before_ns)
        tmp = self.path / f".{name}.tmp"
        group = _group_rows(table)
        pq.write_table(table, tmp, compression="zstd", row_group_size=group)
        _fsync_and_rename(tmp, self.path / name)
        ids = interned_strings(table.column("sample_id"))
        statuses = repeated_strings(table.column("status"))
        errors = {sid: err for sid, status, err in zip(ids, statuses, table.column("error").to_pylist())
                  if status != S.STATUS_OK and err}
        sizes = [min(group, table.num_rows - start) for start in range(0, table.num_rows, group)]
        return PartSummary(name, ids, statuses, sizes, errors, table.column("input_digest").to_pylist())

    def record(self, summary: PartSummary, digests: dict[str, str | None] | None = None) -> None:
        """A part just written here (by this process or a worker): added to the index without reopening it.
        `digests`: the input digests the client sent with the task, for a summary that leaves them out."""
        if self._index is None:
            return   # loaded from the parts when first asked for, the new part included
        if summary.digests is not None:
            values = summary.digests
        else:
            values = [(digests or {}).get(sid) for sid in summary.ids]
        self._merge(self._index, summary.name, summary.ids, summary.statuses, values, summary.group_rows)

    def compact(self, small_only: bool = False) -> int:
        """Rewrite the store's rows (the newest of each sample) into parts of large row groups; returns the parts
        removed. `small_only`: merge only the small parts (see COMPACT_PARTS; what a run does on its own).

        Streams part by part, so memory stays bounded by a row group. The merged part holds only winning rows and
        is newest, and is renamed into place (and the index saved) before the old parts are deleted: a crash in
        between leaves duplicates that read back once. Call it under `lock()`."""
        index = self._load()
        parts = sorted(index.parts)
        if small_only:
            parts = _small_parts(self.path, parts)
        if len(parts) < 2:
            return 0
        name = _part_name(0)
        tmp = self.path / f".{name}.tmp"
        metadata = {k.encode(): v.encode() for k, v in self.metadata().items()}
        schema = self.schema.with_metadata(metadata)
        chosen = set(parts)
        written: list[tuple[list[str], list[str], list[str | None]]] = []
        groups: list[int] = []
        buffer: list[pa.Table] = []
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            def flush() -> None:
                if not buffer:
                    return
                table = pa.concat_tables(buffer).cast(schema)
                buffer.clear()
                writer.write_table(table, row_group_size=table.num_rows)
                groups.append(table.num_rows)
                written.append((interned_strings(table.column("sample_id")), repeated_strings(table.column("status")),
                                table.column("input_digest").to_pylist()))
            rows = nbytes = 0
            for part in parts:
                for table in self._winning_rows(index, part, None, None, None):
                    buffer.append(table)
                    rows, nbytes = rows + table.num_rows, nbytes + table.nbytes
                    if rows >= GROUP_ROWS or nbytes >= GROUP_BYTES:
                        flush()
                        rows = nbytes = 0
            flush()
        _fsync_and_rename(tmp, self.path / name)
        # The new index: the parts kept, and the merged part for the rows it holds.
        kept = _Index(index.parts - chosen, {s: r for s, r in index.rows.items() if r[2] not in chosen})
        kept.parts.add(name)
        for group, (ids, statuses, digests) in enumerate(written):
            for sid, status, dig in zip(ids, statuses, digests):
                kept.rows[sid] = (status, dig, name, group)
        self._index = kept
        self.save_index()
        for part in parts:
            self._forget(part)
            (self.path / part).unlink(missing_ok=True)   # a corrupt part was moved aside while reading
        return len(parts)

    def needs_compaction(self) -> bool:
        """Many small parts: what a run's tasks leave behind."""
        parts = self.parts()
        return len(parts) > COMPACT_PARTS and len(_small_parts(self.path, [p.name for p in parts])) > COMPACT_PARTS

    # ---- the status index ----------------------------------------------------------------------------------------

    def save_index(self) -> None:
        """Write the status index, if this process holds the lock and it changed. Atomic, like a part."""
        if not self._locked or not self.path.is_dir():
            return
        index = self._load()
        if index.saved:
            return
        # A few small parts added since the file was written (an incremental run): readers merge them from the
        # parts in milliseconds, which is cheaper than rewriting an index of 300k rows each time.
        if index.on_disk is not None and index.on_disk <= index.parts:
            added = index.parts - index.on_disk
            if len(added) <= COMPACT_PARTS and sum(row[2] in added for row in index.rows.values()) <= GROUP_ROWS:
                return
        ids = list(index.rows)
        values = list(index.rows.values())
        table = pa.table({"sample_id": ids, "status": [v[0] for v in values], "input_digest": [v[1] for v in values],
                          "part": [v[2] for v in values], "row_group": [v[3] for v in values]}, schema=_INDEX_SCHEMA)
        table = table.replace_schema_metadata({b"affectprep.index_version": INDEX_VERSION.encode(),
                                               b"affectprep.parts": json.dumps(sorted(index.parts)).encode()})
        tmp = self.path / f".{INDEX_FILE}.{os.getpid()}.tmp"
        pq.write_table(table, tmp, compression="zstd", use_dictionary=["part", "status"])
        _fsync_and_rename(tmp, self.path / INDEX_FILE)
        index.saved, index.on_disk = True, frozenset(index.parts)

    def _load(self) -> _Index:
        """The index, checked against the directory listing (one listdir, no part opened when nothing changed)."""
        names = {p.name for p in self.parts()}
        index = self._index
        if index is not None and index.parts == names:
            return index
        if index is None or not index.parts <= names:
            index = self._read_index_file(names)
        if index is None or not index.parts <= names:
            index = _Index(set(), {})   # rebuilt from the parts
        for name in sorted(names - index.parts):
            self._merge_from_file(index, name)
        self._index = index
        return index

    def _read_index_file(self, names: set[str]) -> _Index | None:
        try:
            table = pq.read_table(self.path / INDEX_FILE)
            meta = table.schema.metadata or {}
            if meta.get(b"affectprep.index_version") != INDEX_VERSION.encode():
                return None
            parts = set(json.loads(meta[b"affectprep.parts"]))
        except (FileNotFoundError, OSError, pa.ArrowInvalid, KeyError, ValueError):
            return None   # missing, cut short, foreign: rebuilt from the parts
        if not parts <= names:
            return None
        cols = [interned_strings(table.column("sample_id")), repeated_strings(table.column("status")),
                interned_strings(table.column("input_digest")), repeated_strings(table.column("part")),
                table.column("row_group").to_pylist()]
        rows = {sid: (status, dig, part, group) for sid, status, dig, part, group in zip(*cols)}
        return _Index(parts, rows, saved=True, on_disk=frozenset(parts))

    def _merge_from_file(self, index: _Index, name: str) -> None:
        part = self.path / name
        table = self._read_part(part, ["sample_id", "status", "input_digest"])
        if table is None:
            return   # quarantined: not a part any more
        try:
            meta = pq.read_metadata(part)
            groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        except (OSError, pa.ArrowInvalid):
            return
        self._merge(index, name, interned_strings(table.column("sample_id")), repeated_strings(table.column("status")),
                    interned_strings(table.column("input_digest")), groups)

    @staticmethod
    def _merge(index: _Index, name: str, ids: list[str], statuses: list[str], digests: list[str | None],
               group_rows: list[int]) -> None:
        """Add a part's rows: a row wins where its part is newer (sorts later) than the one holding the sample."""
        positions = [g for g, n in enumerate(group_rows) for _ in range(n)]
        rows = index.rows
        for sid, status, dig, group in zip(ids, statuses, digests, positions):
            held = rows.get(sid)
            if held is None or held[2] <= name:
                rows[sid] = (status, dig, name, group)
        index.parts.add(name)
        index.saved, index._winners = False, None

    # ---- reading -------------------------------------------------------------------------------------------------

    def parts(self) -> list[Path]:
        """Part files, oldest first (their names start with a nanosecond timestamp)."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.glob("part-*.parquet"))

    def exists(self) -> bool:
        return bool(self.parts())

    def metadata(self) -> dict[str, str]:
        """Key/value metadata of the newest part (the adapters put the label set and exclusions here)."""
        for part in reversed(self.parts()):
            schema = self._read_schema(part)
            if schema is not None:
                return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        return {}

    def statuses(self) -> dict[str, str]:
        """sample_id -> status of its newest row, from the status index."""
        return {sid: row[0] for sid, row in self._load().rows.items()}

    def completion(self) -> dict[str, tuple[str, str | None]]:
        """sample_id -> (status, input digest) of its newest row, from the status index."""
        return {sid: (row[0], row[1]) for sid, row in self._load().rows.items()}

    def read(self, columns: list[str] | None = None, ids: Iterable[str] | None = None,
             status: str | None = None) -> pa.Table:
        """The newest row of each sample, optionally only `ids` and only rows with `status`."""
        return pa.concat_tables(list(self.iter_tables(columns, ids, status)) or
                                [self.schema.empty_table().select(columns or self.schema.names)])

    def iter_tables(self, columns: list[str] | None = None, ids: Iterable[str] | None = None,
                    status: str | None = None) -> Iterator[pa.Table]:
        """Stream the store a row group at a time, so memory stays bounded whatever the store's size. With `ids`,
        only the row groups holding their newest rows are read."""
        wanted = set(ids) if ids is not None else None
        cols = columns or self.schema.names
        for _ in range(3):   # a part found corrupt is quarantined, and its samples read from their older rows
            index = self._load()
            lost: set[str] = set()
            located = None if wanted is None else _locate(index, wanted)   # part -> its row groups to read
            for part in sorted(index.parts) if located is None else sorted(located):
                try:
                    for table in self._winning_rows(index, part, wanted, None if located is None else located[part],
                                                    cols):
                        if status is not None:
                            table = table.filter(pc.equal(table.column("status"), status))
                        if table.num_rows:
                            yield table.select(cols)
                except _Corrupt:
                    lost |= {s for s, r in index.rows.items() if r[2] == part and (wanted is None or s in wanted)}
            if not lost:
                return
            wanted = lost

    def _winning_rows(self, index: _Index, part: str, wanted: set[str] | None, groups: set[int] | None,
                      columns: list[str] | None) -> Iterator[pa.Table]:
        """The rows of `part` that are their sample's newest (and wanted), a row group at a time: `groups`, or
        every row group."""
        rows = index.rows
        out_cols = columns or self.schema.names
        read_cols = list(dict.fromkeys(["sample_id", "status", *out_cols]))
        wanted_array = None
        try:
            file = self._file(part)
            for group in (sorted(groups) if groups is not None else range(file.metadata.num_row_groups)):
                table = file.read_row_group(group, columns=read_cols)
                if index.winners(part, group) == table.num_rows:   # every row is its sample's newest
                    if wanted is not None:
                        if wanted_array is None:
                            wanted_array = pa.array(list(wanted), pa.string())
                        table = table.filter(pc.is_in(table.column("sample_id"), value_set=wanted_array))
                else:
                    keep = [(r := rows.get(sid)) is not None and r[2] == part and r[3] == group
                            and (wanted is None or sid in wanted) for sid in table.column("sample_id").to_pylist()]
                    table = table.filter(pa.array(keep, pa.bool_()))
                if table.num_rows:
                    yield table.select(list(dict.fromkeys([*out_cols, "status"])))
        except FileNotFoundError:
            self._index = None   # compacted away under us: read again from the new parts
            self._forget(part)
            raise _Corrupt() from None
        except (pa.ArrowInvalid, OSError) as e:
            self._forget(part)
            self._quarantine(self.path / part, e)
            self._index = None
            raise _Corrupt() from None

    def _forget(self, part: str) -> None:
        file = self._files.pop(part, None)
        if file is not None:
            file.close()

    def _file(self, part: str) -> pq.ParquetFile:
        file = self._files.get(part)
        if file is None:
            file = pq.ParquetFile(self.path / part)
            self._check_version(self.path / part, file.schema_arrow)
            if len(self._files) >= 64:
                self._files.pop(next(iter(self._files))).close()
            self._files[part] = file
        return file

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.parts())

    def _check_version(self, part: Path, schema: pa.Schema) -> None:
        version = (schema.metadata or {}).get(b"affectprep.schema_version", b"?").decode()
        if version != str(S.SCHEMA_VERSION):
            raise SchemaMismatch(f"{part} has schema version {version}, this affectprep reads {S.SCHEMA_VERSION}; "
                                 f"rerun the stage or delete {self.path}")

    def _read_part(self, part: Path, columns: list[str]) -> pa.Table | None:
        """The part's columns; None for a part that is not readable Parquet (quarantined on the spot)."""
        schema = self._read_schema(part)
        if schema is None:
            return None
        self._check_version(part, schema)
        try:
            return pq.read_table(part, columns=columns)
        except FileNotFoundError:
            return None
        except (pa.ArrowInvalid, OSError) as e:
            self._quarantine(part, e)
            return None

    def _read_schema(self, part: Path) -> pa.Schema | None:
        try:
            return pq.read_schema(part)
        except FileNotFoundError:
            return None
        except (pa.ArrowInvalid, OSError) as e:
            self._quarantine(part, e)
            return None

    def _quarantine(self, part: Path, error: Exception) -> None:
        """A part that is not Parquet (a zero-byte file, garbage, a copy cut short) is moved aside as
        `<name>.corrupt`, so the store reads as if it were not there and its samples are done again; the other
        parts, and the work in them, are kept. `corrupt_parts()` lists what was moved."""
        target = part.with_name(part.name + CORRUPT_SUFFIX)
        try:
            os.replace(part, target)
        except FileNotFoundError:   # another reader moved it first
            pass
        reason = str(error).splitlines()[0][:200]
        QUARANTINED.append((target, reason))

    def corrupt_parts(self) -> list[Path]:
        """Parts moved aside because they could not be read (see `_quarantine`)."""
        return sorted(self.path.glob(f"part-*{CORRUPT_SUFFIX}")) if self.path.is_dir() else []


def interned_strings(column: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """A column of sample ids (or input digests) as Python strings, interned: the index, every stage's status
    index and the planner hold the same 300k of them, and each copy costs ~60 bytes a sample."""
    values = column.to_pylist()
    if column.null_count == 0:
        return list(map(sys.intern, values))
    return [None if value is None else sys.intern(value) for value in values]


def repeated_strings(column: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """A column of few distinct strings (statuses, part names, media kinds), each value one shared object."""
    encoded = pc.dictionary_encode(column)
    chunks = encoded.chunks if isinstance(encoded, pa.ChunkedArray) else [encoded]
    out: list[str | None] = []
    for chunk in chunks:
        values = chunk.dictionary.to_pylist()
        out += [None if i is None else values[i] for i in chunk.indices.to_pylist()]
    return out


def _locate(index: _Index, ids: set[str]) -> dict[str, set[int]]:
    """part -> the row groups holding the newest rows of `ids` (ids not stored are left out)."""
    rows = index.rows
    located: dict[str, set[int]] = {}
    for part, group in {(row[2], row[3]) for sid in ids if (row := rows.get(sid)) is not None}:
        located.setdefault(part, set()).add(group)
    return located


class _Corrupt(Exception):
    """A part vanished or could not be read while streaming it."""


def _part_name(not_before_ns: int) -> str:
    stamp = max(time.time_ns(), not_before_ns)
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:16] or "host"
    return f"part-{stamp:020d}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"


def next_part_floor(store: Store) -> int:
    """A timestamp after every part of the store: a run's parts named from it sort after all that exist."""
    stamps = [int(p.name.split("-")[1]) for p in store.parts() if p.name.split("-")[1].isdigit()]
    return max([time.time_ns(), *(s + 1 for s in stamps)])


def _group_rows(table: pa.Table) -> int:
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    return max(1, min(GROUP_ROWS, GROUP_BYTES // per_row))


def _small_parts(folder: Path, names: list[str]) -> list[str]:
    """The parts of fewer than GROUP_ROWS rows and SMALL_PART_BYTES bytes (an unreadable one counts as small)."""
    small = []
    for name in names:
        try:
            path = folder / name
            if path.stat().st_size < SMALL_PART_BYTES and pq.read_metadata(path).num_rows < GROUP_ROWS:
                small.append(name)
        except FileNotFoundError:
            continue
        except (OSError, pa.ArrowInvalid):
            small.append(name)
    return small


def list_keys(cache: Path, dataset: str, stage: str) -> list[str]:
    """Every key (version) stored for a dataset's stage, newest first."""
    folder = Path(cache) / dataset / stage
    if not folder.is_dir():
        return []
    keys = [p for p in folder.iterdir() if p.is_dir()]
    return [p.name for p in sorted(keys, key=lambda p: p.stat().st_mtime, reverse=True)]


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    _fsync_and_rename(tmp, target)


def _fsync_and_rename(tmp: Path, target: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
