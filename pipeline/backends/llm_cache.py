"""Persistent cache of successful LLM answers: one small JSON file per request key.

One file per key (under a two-character shard folder) rather than one database, because the cache must be shared
by every process of a run, including Dask workers on other machines over a network file system, where sqlite's
locking is unreliable. Each file is written to a temporary name and renamed into place, so a reader sees a
whole answer or none, and two processes writing the same key both write the same answer.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class ResponseCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The cached records of those keys that have one; an unreadable file counts as absent."""
        found = {}
        for key in keys:
            try:
                record = json.loads(self._path(key).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                found[key] = record
        return found

    def put(self, key: str, record: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
