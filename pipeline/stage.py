"""The stage contract.

A stage is a config dataclass plus a function from input rows to output rows. It declares which columns it reads from
which upstream stores and which schema it writes; the DAG checks both before it runs anything. Heavy models load in
`setup()`, once per worker process. A sample that fails becomes an output row with status "failed" and an error a
person can read; it never stops the batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from affectprep import schema as S


class SampleError(Exception):
    """A per-sample failure whose message is already fit for a person to read (no exception type prefix)."""


class Stage:
    name: ClassVar[str]
    version: ClassVar[int]                          # bump when the output changes for the same config
    Config: ClassVar[type]                          # frozen dataclass; every field has a default
    reads: ClassVar[dict[str, tuple[str, ...]]]     # upstream store -> columns this stage needs from it
    media_kinds: ClassVar[frozenset[str]] = frozenset({"video", "frames", "image", "audio"})  # samples it applies to
    needs_label: ClassVar[bool] = False             # applies only to samples with a class label (not AU-only data)
    # "sample": process() maps rows to rows on the workers. "dataset": process_dataset() sees every sample at once
    # (it trains on them), and runs in the client once the stages before it are complete.
    scope: ClassVar[str] = "sample"
    batch_size: ClassVar[int | None] = None         # samples per Dask task, when the stage wants more than the default
    # Whether one set-up instance may serve several threads of a worker at once. Backends rarely are (OpenCV's
    # cascades, dlib, decoders keep state per call), so by default every worker thread sets up its own instance.
    thread_safe: ClassVar[bool] = False
    # Whether the stage makes one store per test fold of a fold-based dataset (its output for a sample depends on
    # which samples are the test set: the emotions baseline must not learn fold k's test labels for fold k).
    # Stages reading such a store get one per fold too. `context["test_fold"]` says which.
    per_test_fold: bool = False
    # Config fields that change how the work is done, not what it gives (requests in flight, timeouts, retries,
    # price tables): left out of the store key, so changing one keeps the version.
    operational: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any):
        self.config = config
        # Set by the DAG before the stage is shipped to workers: cache root, dataset name, label set names.
        self.context: dict[str, Any] = {}

    @classmethod
    def schema(cls) -> pa.Schema:
        return S.schema_for(cls.name)

    def keyed_config(self) -> dict[str, Any]:
        """The config values that go into the store key: all but the operational ones."""
        return {k: v for k, v in config_dict(self.config).items() if k not in self.operational}

    def identity(self) -> dict[str, Any]:
        """What else determines the output: backend model name and weights hash, prompt file hashes."""
        return {}

    def enabled(self) -> bool:
        """False for an optional stage with nothing to do in this configuration (no backbone set): runs that do
        not name it leave it out."""
        return True

    def disabled_reason(self) -> str:
        """What to configure to enable the stage, for the error when a disabled stage is asked for."""
        return ""

    def skip_note(self, media_kinds: set[str]) -> str | None:
        """Why the stage leaves out samples of these media kinds that its class would take (its config rules
        them out), for the run's summary; None when there is nothing to say."""
        return None

    def runs_in_client(self) -> bool:
        """True for work that only waits on a remote service (LLM requests) or costs nothing: it runs in the
        client process, with the backend's own concurrency, instead of being shipped to Dask workers."""
        return False

    def resources(self) -> dict[str, float]:
        """Dask worker resources a task needs on a cluster: {"GPU": 1} when the stage's config puts its model on a
        CUDA device; workers advertise them with `dask worker --resources GPU=1`."""
        return {"GPU": 1} if str(getattr(self.config, "device", "cpu")).startswith("cuda") else {}

    def setup(self) -> None:
        """Load models. Called once per worker process before the first batch."""

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Input rows (the joined `reads` columns) -> one output row each. Override for batched inference."""
        return [self.process_guarded(row) for row in rows]

    def process_one(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def process_dataset(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """For scope "dataset": every applicable sample's joined input rows -> output rows for those in `rows`
        that are flagged `"pending": True` (the others are there to learn from)."""
        raise NotImplementedError

    def input_digests(self, ready: list[dict[str, Any]]) -> dict[str, str]:
        """For scope "dataset": the input digest of each ready sample (`ready` holds their index fields and their
        own `input_digest`). A stage whose output for a sample depends on other samples (it trains on their
        labels) mixes in what it learns from for that sample; by default a sample's digest is its own."""
        return {s["sample_id"]: s["input_digest"] for s in ready}

    def process_guarded(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            out = self.process_one(row)
        except SampleError as e:
            return failed_row(row["sample_id"], str(e))
        except Exception as e:  # noqa: BLE001 - any other failure is recorded on the sample, never raised
            return failed_row(row["sample_id"], f"{type(e).__name__}: {e}")
        return {"sample_id": row["sample_id"], "status": S.STATUS_OK, "error": None, **out}


def failed_row(sample_id: str, error: str) -> dict[str, Any]:
    return {"sample_id": sample_id, "status": S.STATUS_FAILED, "error": error}


def config_dict(config: Any) -> dict[str, Any]:
    return _jsonable(dataclasses.asdict(config))


def cache_key(payload: dict[str, Any]) -> str:
    """Hash of everything that can change a stage's output. A value that cannot be hashed is an error."""
    text = json.dumps(payload, sort_keys=True, default=_refuse)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# What json.dumps(parts, default=str, separators=(",", ":")) makes, without building an encoder per sample.
_DIGEST_JSON = json.JSONEncoder(default=str, separators=(",", ":"))


def digest(parts: Any) -> str:
    """A sample's input digest (see schema `input_digest`): short, stable across processes and machines."""
    return hashlib.blake2b(_DIGEST_JSON.encode(parts).encode(), digest_size=8).hexdigest()


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _refuse(value: Any) -> Any:
    raise TypeError(f"cannot hash {type(value).__name__} value {value!r} into a cache key")
