"""Parquet stores: one folder per (dataset, stage, cache key), holding immutable part files.

    <cache>/<dataset>/<stage>/<key>/
        config.json           the fully resolved config and input keys that produced this key
        part-<ns>-<pid>-<rand>.parquet
        .lock                 held (flock) by the run writing here

Each part file is written to a temporary name and renamed, so a reader never sees half a file and a killed run loses
only the samples in flight. A sample is done once a part holds a row for it; if a sample is written again (a
retried failure, a compaction), the row in the newest part wins, so every sample reads back exactly once.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from affectprep import schema as S


CORRUPT_SUFFIX = ".corrupt"
# Parts this process quarantined, (new path, reason), for the command to report at its end.
QUARANTINED: list[tuple[Path, str]] = []


class StoreLocked(Exception):
    """Another run is writing this store."""


class SchemaMismatch(Exception):
    """A part file was written by an incompatible schema version."""


class Store:
    def __init__(self, cache: Path, dataset: str, stage: str, key: str):
        self.cache, self.dataset, self.stage, self.key = Path(cache), dataset, stage, key
        self.path = self.cache / dataset / stage / key
        self.schema = S.schema_for(stage)
        self._winners: tuple[tuple[Path, ...], dict[str, int]] = ((), {})

    def __repr__(self) -> str:
        return f"Store({self.dataset}/{self.stage}/{self.key})"

    # ---- writing -------------------------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writer lock. flock is released by the kernel when the holder dies, even by SIGKILL."""
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
            yield
        finally:
            os.close(fd)

    def _remove_orphans(self) -> None:
        """Temporary files of a writer that was killed before its rename. Only the lock holder writes here, so
        whatever temporary file exists when the lock is taken belongs to no one."""
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

    def write(self, rows: list[dict[str, Any]] | pa.Table, metadata: dict[str, str] | None = None) -> Path | None:
        """Append rows as one new part file, atomically. Returns its path (None for no rows)."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=self.schema)
        if table.num_rows == 0:
            return None
        if metadata:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   **{k.encode(): v.encode() for k, v in metadata.items()}})
        self.path.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.path / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        _fsync_and_rename(tmp, self.path / name)
        return self.path / name

    def compact(self) -> int:
        """Rewrite the store as one part holding the newest row of each sample; returns the parts removed.

        Streams part by part, so memory stays bounded by one part. The merged part is renamed into place before the
        old parts are deleted: a crash in between leaves duplicates that read back once (the merged part is newest).
        Call it under `lock()`."""
        parts = self.parts()
        if len(parts) < 2:
            return 0
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.path / f".{name}.tmp"
        metadata = {k.encode(): v.encode() for k, v in self.metadata().items()}
        with pq.ParquetWriter(tmp, self.schema.with_metadata(metadata), compression="zstd") as writer:
            for table in self.iter_tables():
                writer.write_table(table.cast(self.schema.with_metadata(metadata)))
        _fsync_and_rename(tmp, self.path / name)
        for part in parts:
            part.unlink(missing_ok=True)   # a corrupt part was moved aside while reading
        self._winners = ((), {})
        return len(parts)

    # ---- reading -------------------------------------------------------------------------------------------------

    def parts(self) -> list[Path]:
        """Part files, oldest first (their names start with a nanosecond timestamp)."""
        if not self.path.is_dir():
            return []
        return sorted(self.path.glob("part-*.parquet"))

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
        """sample_id -> status of its newest row. Reads only two small columns."""
        return {sid: status for sid, (status, _) in self.completion().items()}

    def completion(self) -> dict[str, tuple[str, str | None]]:
        """sample_id -> (status, input digest) of its newest row. Reads only three small columns."""
        out: dict[str, tuple[str, str | None]] = {}
        for part in self.parts():
            t = self._read_part(part, ["sample_id", "status", "input_digest"])
            if t is None:
                continue
            out.update(zip(t.column("sample_id").to_pylist(),
                           zip(t.column("status").to_pylist(), t.column("input_digest").to_pylist())))
        return out

    def read(self, columns: list[str] | None = None, ids: Iterable[str] | None = None,
             status: str | None = None) -> pa.Table:
        """The newest row of each sample, optionally only `ids` and only rows with `status`."""
        return pa.concat_tables(list(self.iter_tables(columns, ids, status)) or
                                [self.schema.empty_table().select(columns or self.schema.names)])

    def iter_tables(self, columns: list[str] | None = None, ids: Iterable[str] | None = None,
                    status: str | None = None) -> Iterator[pa.Table]:
        """Stream the store part by part, so memory stays bounded by one part whatever the store's size."""
        wanted = set(ids) if ids is not None else None
        parts, winner = self._winning_parts()
        # With ids given, only the parts that hold their newest rows are opened.
        needed = {winner[s] for s in wanted if s in winner} if wanted is not None else range(len(parts))
        cols = columns or self.schema.names
        read_cols = list(dict.fromkeys(["sample_id", "status", *cols]))
        for i in sorted(needed):
            t = self._read_part(parts[i], read_cols)
            if t is None:
                continue
            keep = [winner[sid] == i and (wanted is None or sid in wanted)
                    for sid in t.column("sample_id").to_pylist()]
            t = t.filter(pa.array(keep, pa.bool_()))
            if status is not None:
                t = t.filter(pc.equal(t.column("status"), status))
            if t.num_rows:
                yield t.select(cols)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.parts())

    def _winning_parts(self) -> tuple[tuple[Path, ...], dict[str, int]]:
        """The parts, and for each sample the position of the part holding its newest row. Cached until the set
        of parts changes, so reading a few samples at a time does not rescan the store."""
        parts = tuple(self.parts())
        cached_parts, winner = self._winners
        if parts[:len(cached_parts)] != cached_parts:
            cached_parts, winner = (), {}
        for i in range(len(cached_parts), len(parts)):
            table = self._read_part(parts[i], ["sample_id"])
            if table is None:   # quarantined: the part positions changed
                self._winners = ((), {})
                return self._winning_parts()
            for sid in table.column("sample_id").to_pylist():
                winner[sid] = i
        self._winners = (parts, winner)
        return parts, winner

    def _read_part(self, part: Path, columns: list[str]) -> pa.Table | None:
        """The part's columns; None for a part that is not readable Parquet (quarantined on the spot)."""
        schema = self._read_schema(part)
        if schema is None:
            return None
        version = (schema.metadata or {}).get(b"affectprep.schema_version", b"?").decode()
        if version != str(S.SCHEMA_VERSION):
            raise SchemaMismatch(f"{part} has schema version {version}, this affectprep reads {S.SCHEMA_VERSION}; "
                                 f"rerun the stage or delete {self.path}")
        try:
            return pq.read_table(part, columns=columns)
        except pa.ArrowInvalid as e:
            self._quarantine(part, e)
            return None

    def _read_schema(self, part: Path) -> pa.Schema | None:
        try:
            return pq.read_schema(part)
        except pa.ArrowInvalid as e:
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
