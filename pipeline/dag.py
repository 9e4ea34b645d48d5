"""Run the stages of a project as a Dask DAG, incrementally and resumably.

Per dataset: build (or reuse) the index, ask the dataset's plan (planner.py) which samples each stage still has
to do, and submit a chain of tasks from the first stage a sample needs to the target stage, up to TASK_ROWS samples per
task. A task runs its samples through every stage of the chain a batch at a time, buffering each stage's rows until
a row / byte / time bound, then writes one part per stage itself (atomic, unique name, next to the store) and
returns only ids, statuses, errors and part names: the client records completion and never carries the rows. A
killed run loses only what was buffered in flight (at most TASK_SECONDS of work per task). Samples a task left
for the time bound come back as a new task. Local runs start an in-process LocalCluster; `scheduler="tcp://host:port"` uses an existing
cluster; `scheduler="inline"` runs everything in this process, one batch at a time, for debugging.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from affectprep import schema as S
from affectprep.config import ConfigError, DatasetConfig, ProjectConfig
from affectprep.hub import offline_if_unreachable
from affectprep.store import PartSummary, Store, list_keys, next_part_floor

from .datasets import DatasetError, index_table
from .planner import (DatasetPlan, StagePlan, applies_to, dataset_names, describe, index_counts, index_store,
                      plan_stages, stage_configs)
from .stage import Stage, failed_row
from .stages import STAGES

__all__ = ["DatasetPlan", "RunReport", "StagePlan", "StageReport", "applies_to", "dataset_names", "describe",
           "ensure_index", "index_store", "joined_rows", "plan_stages", "run_pipeline", "stage_configs"]


# A task's bounds: samples per task, and what it buffers before writing its parts and returning.
TASK_ROWS = 1024
TASK_BYTES = 256 << 20
TASK_SECONDS = 30.0


class StageSetupError(Exception):
    """A stage could not load its backend; every sample would fail the same way, so the run stops."""


@dataclass
class StageReport:
    dataset: str
    stage: str
    key: str
    total: int = 0          # samples this stage applies to (index-ok, right media kind, within --limit)
    done_before: int = 0    # already done (current) for this key before the run
    ok: int = 0             # newly done in this run
    failed: int = 0         # newly failed in this run
    blocked: int = 0        # not attempted because an upstream stage failed for them
    failed_total: int = 0   # failed for this key, including earlier runs
    stale: int = 0          # stored rows made from other inputs (a relabelled sample, a changed media path)
    note: str | None = None  # why the stage leaves this dataset's samples out, when its config rules them out


@dataclass
class RunReport:
    stages: list[StageReport] = field(default_factory=list)
    index: dict[str, dict[str, Any]] = field(default_factory=dict)   # dataset -> ok / failed / excluded counts
    client_bytes: int = 0   # pickled size of the task results the client received (ids, statuses, part names)

    @property
    def failed(self) -> int:
        return sum(r["failed"] for r in self.index.values()) + sum(s.failed_total for s in self.stages)


def ensure_index(project: ProjectConfig, ds: DatasetConfig) -> Store:
    """Build the index, and store the rows that are new or changed since the last run. The annotations are in the
    key, but the media are not (hashing 65k videos is too slow): a clip added or repaired since the last run turns
    from failed to ok here, and then counts as pending for the stages after. Media an earlier index of the dataset
    found usable are not checked again (see datasets/base.py: a deleted file fails at the stage that reads it), so
    an index under the same annotations with no failed row cannot change, and is not read again at all."""
    store, adapter, config = index_store(project, ds)
    if store.exists() and S.STATUS_FAILED not in set(store.statuses().values()):
        return store
    adapter.checked_media = checked_media(project, ds, store)
    try:
        table = index_table(adapter)
    except DatasetError as e:
        raise ConfigError(f"dataset '{ds.name}': {e}") from None
    with store.lock():
        if not store.exists():
            store.write_config(config)
            store.write(table)
            return store
        changed = changed_rows(table, store.read())
        if len(changed):
            store.write(table.take(changed))
    return store


def checked_media(project: ProjectConfig, ds: DatasetConfig, store: Store) -> dict[str, str]:
    """Media path (relative to the root, as the index stores it) -> media kind of the ok samples of the dataset's
    index as the annotations are now, or else of its newest index (annotations edited since: most media are the
    same files)."""
    source = store if store.exists() else next(
        (s for key in list_keys(project.cache, ds.name, "index") if (s := Store(project.cache, ds.name, "index", key))
         .exists()), None)
    if source is None:
        return {}
    table = source.read(["media_path", "media_kind"], status=S.STATUS_OK)
    return dict(zip(table.column("media_path").to_pylist(), table.column("media_kind").to_pylist()))


def changed_rows(new: pa.Table, old: pa.Table) -> pa.Array:
    """Positions of the rows of `new` with no row of the same sample_id in `old`, or a different one. Null equals
    null, and NaN equals NaN (an unknown AU), unlike Arrow's `equal`."""
    position = pc.index_in(new.column("sample_id"), value_set=old.column("sample_id"))
    same = pc.is_valid(position)
    aligned = old.take(position)
    for name in new.schema.names:
        same = pc.and_(same, _same_values(new.column(name).combine_chunks(), aligned.column(name).combine_chunks()))
    return pc.indices_nonzero(pc.invert(same))


def _same_values(a: pa.Array, b: pa.Array) -> pa.Array:
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    if pa.types.is_list(a.type):
        lengths = pc.fill_null(pc.equal(pc.list_value_length(a), pc.list_value_length(b)), False)
        same = pc.or_(both_null, lengths)
        # Values compared flat, over the rows whose lengths agree; a row with one differing value differs.
        rows = pc.indices_nonzero(pc.and_(lengths, pc.is_valid(a)))
        flat_a, flat_b = a.take(rows), b.take(rows)
        values = _same_values(pc.list_flatten(flat_a), pc.list_flatten(flat_b))
        differing = pc.unique(pc.filter(pc.list_parent_indices(flat_a), pc.invert(values)))
        if len(differing):
            mask = np.ones(len(a), dtype=bool)
            mask[rows.to_numpy()[differing.to_numpy()]] = False
            same = pc.and_(same, pa.array(mask))
        return same
    same = pc.or_(both_null, pc.fill_null(pc.equal(a, b), False))
    if pa.types.is_floating(a.type):
        same = pc.or_(same, pc.fill_null(pc.and_(pc.is_nan(a), pc.is_nan(b)), False))
    return same


# ---- execution -----------------------------------------------------------------------------------------------------

class _WorkerState(threading.local):
    """What a worker keeps between tasks, per thread: a Dask worker runs several threads by default, and the
    backends behind a stage (OpenCV cascades, dlib and torch models, decoders) are not safe to share between
    threads, so each thread sets up its own stage instances. A stage that declares `thread_safe` shares one
    instance per process (set up under a lock)."""

    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}
        self.stores: dict[Path, Store] = {}


_WORKER = _WorkerState()
_SHARED_STAGES: dict[str, Stage] = {}
_SHARED_LOCK = threading.Lock()


def _worker_stage(stage: Stage, key: str) -> Stage:
    """The set-up instance of a stage for this worker thread (or process, for a thread-safe stage). The key says
    what the stage computes, not where: the task's context (dataset root, store) is the one that travelled with
    it, since two projects (a moved copy) share keys."""
    if stage.thread_safe:
        with _SHARED_LOCK:
            if key not in _SHARED_STAGES:
                _SHARED_STAGES[key] = _set_up(stage)
            ready = _SHARED_STAGES[key]
    else:
        if key not in _WORKER.stages:
            _WORKER.stages[key] = _set_up(stage)
        ready = _WORKER.stages[key]
    ready.context = stage.context
    return ready


def _set_up(stage: Stage) -> Stage:
    offline_if_unreachable()   # a worker of an external cluster has its own environment: it asks for itself
    try:
        stage.setup()
    except Exception as e:  # noqa: BLE001
        raise StageSetupError(f"stage '{stage.name}' could not start: {type(e).__name__}: {e}") from e
    return stage


@dataclass(frozen=True)
class StoreSlice:
    """Some columns of some samples of a store, read where the task runs: the worker reads crops straight from
    the store (a filesystem every worker sees, like the media) instead of the client shipping them."""
    cache: Path
    dataset: str
    stage: str
    key: str
    columns: tuple[str, ...]
    ids: tuple[str, ...]

    def read(self) -> list[dict[str, Any]]:
        path = Path(self.cache) / self.dataset / self.stage / self.key
        # One Store per worker thread and path, so its cached map of which part holds each sample is built once.
        store = _WORKER.stores.setdefault(path, Store(self.cache, self.dataset, self.stage, self.key))
        return store.read(list(self.columns), ids=self.ids).to_pylist()


def run_batch(stage: Stage, key: str, ids: list[str], inputs: dict[str, Any], digests: dict[str, str]) -> list[dict]:
    """Runs on a worker: join the upstream rows of `ids`, process those whose upstream rows are all ok, and stamp
    each output row with its sample's input digest."""
    stage = _worker_stage(stage, key)
    by_id: dict[str, dict[str, Any]] = {sid: {"sample_id": sid} for sid in ids}
    usable = set(ids)
    for upstream, rows in inputs.items():
        if isinstance(rows, StoreSlice):
            rows = rows.read()
        seen = set()
        for row in rows:
            if row["status"] != S.STATUS_OK:
                continue
            seen.add(row["sample_id"])
            by_id[row["sample_id"]].update({c: row[c] for c in stage.reads[upstream]})
        usable &= seen
    rows = [by_id[sid] for sid in ids if sid in usable]
    out = stage.process([resolve_media(row, stage.context.get("root")) for row in rows])
    for row in out:
        row["input_digest"] = digests.get(row["sample_id"])
    return out


@dataclass(frozen=True)
class ChainStep:
    """One stage of a task's chain: the stage, the store it writes, where its inputs come from (a StoreSlice
    without ids for an upstream read from its store; None for one computed earlier in the chain), and the input
    digest each sample's row must carry."""
    stage: Stage
    key: str
    store: tuple[str, str, str, str]                # cache, dataset, stage, key
    inputs: dict[str, "StoreSlice | None"]
    digests: dict[str, str | None]
    not_before_ns: int                              # the run's parts sort after every part before it


@dataclass
class StepResult:
    part: PartSummary | None = None   # the part this task wrote for the step (digests left out: the client has them)
    attempted: int = 0                # samples given to the step (those without a row were blocked upstream)


@dataclass
class ChainResult:
    done: list[str]                   # samples run through the chain
    remaining: list[str]              # left for the time / size bound: the client submits them again
    steps: list[StepResult]
    retry_alone: list[str] = field(default_factory=list)   # a batch whose stage raised: each sample again alone


def run_chain(steps: list[ChainStep], ids: list[str], batch: int,
              bounds: tuple[int, int, float] = (TASK_ROWS, TASK_BYTES, TASK_SECONDS)) -> ChainResult:
    """Runs on a worker: `ids` through every step, `batch` samples at a time, buffering each step's rows until a
    row / byte / time bound; then one part per step, written here (the rows never travel to the client)."""
    max_rows, max_bytes, max_seconds = bounds
    start = time.monotonic()
    buffers: list[list[dict]] = [[] for _ in steps]
    results = [StepResult() for _ in steps]
    done: list[str] = []
    retry: list[str] = []
    pending = list(ids)
    nbytes = 0
    # The index's rows are small: read once for the task (a row group holds thousands), the others per batch.
    prefetched = {up: {row["sample_id"]: row for row in replace(src, ids=tuple(ids)).read()}
                  for step in steps for up, src in step.inputs.items() if src is not None and up == "index"}
    while pending:
        sub, pending = pending[:batch], pending[batch:]
        produced: dict[str, list[dict]] = {}
        for i, step in enumerate(steps):
            inputs = {up: produced[up] if src is None else
                      [prefetched[up][sid] for sid in sub if sid in prefetched[up]] if up in prefetched else
                      replace(src, ids=tuple(sub)) for up, src in step.inputs.items()}
            try:
                out = run_batch(step.stage, step.key, sub, inputs, step.digests)
            except StageSetupError:
                raise
            except Exception as e:  # noqa: BLE001 - isolate the sample, as the client does for a dead worker
                if len(sub) > 1:
                    retry += sub
                    break
                out = [failed_row(sub[0], f"worker failed while processing this sample: {type(e).__name__}: {e}")]
                out[0]["input_digest"] = step.digests.get(sub[0])
            produced[step.stage.name] = out
            buffers[i].extend(out)
            results[i].attempted += len(sub)
            nbytes += sum(_row_bytes(row) for row in out)
        else:
            done += sub
        if (max(len(b) for b in buffers) >= max_rows or nbytes >= max_bytes
                or time.monotonic() - start >= max_seconds):
            break
    for step, rows, result in zip(steps, buffers, results):
        store = Store(*step.store)
        result.part = store.write_part(rows, not_before_ns=step.not_before_ns)
        if result.part is not None:
            result.part.digests = None
    return ChainResult(done, pending, results, retry)


def _row_bytes(row: dict[str, Any]) -> int:
    """Roughly what a row weighs in a part: its binary payloads (crops, waveforms, features) dominate."""
    total = 64
    for value in row.values():
        if isinstance(value, (bytes, str)):
            total += len(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            total += sum(len(v) for v in value)
        elif isinstance(value, list):
            total += 8 * len(value)
    return total


def resolve_media(row: dict[str, Any], root: str | None) -> dict[str, Any]:
    """The index holds media paths relative to the dataset root; stages get them resolved against where the
    dataset is now."""
    if root and row.get("media_path"):
        return {**row, "media_path": str(Path(root) / row["media_path"])}
    return row


class _InlineClient:
    """The slice of dask.distributed.Client that the runner uses, executed in this process."""

    def submit(self, fn: Callable, *args: Any, **_: Any) -> Future:
        future: Future = Future()
        try:
            args = tuple({k: v.result() if isinstance(v, Future) else v for k, v in a.items()}
                         if isinstance(a, dict) else a for a in args)
            future.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - delivered through the future, as Dask would
            future.set_exception(e)
        return future

    def close(self) -> None:
        pass


class _InlineAsCompleted:
    def __init__(self) -> None:
        self.queue: deque[Future] = deque()

    def add(self, future: Future) -> None:
        self.queue.append(future)

    def __iter__(self) -> Iterator[Future]:
        while self.queue:
            yield self.queue.popleft()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


SCHEDULER_PROTOCOLS = ("tcp", "tls", "inproc", "ucx", "ws", "wss")


def check_scheduler(scheduler: str | None) -> None:
    """A scheduler address is 'inline' or PROTOCOL://HOST:PORT of a dask.distributed scheduler."""
    if scheduler in (None, "inline"):
        return
    protocol, sep, rest = scheduler.partition("://")
    if not sep or protocol not in SCHEDULER_PROTOCOLS or not rest:
        raise ConfigError(f"--scheduler {scheduler!r}: expected 'inline' or the address of a dask.distributed "
                          f"scheduler, e.g. tcp://host:8786 ({', '.join(p + '://' for p in SCHEDULER_PROTOCOLS)})")


def _connect(scheduler: str | None, workers: int, stack: ExitStack) -> tuple[Any, Callable[[], Any], int]:
    if scheduler == "inline":
        return _InlineClient(), _InlineAsCompleted, 1
    from distributed import Client, LocalCluster, as_completed
    if scheduler:
        try:
            client = stack.enter_context(Client(scheduler, timeout="20s"))
        except (OSError, ValueError, TimeoutError) as e:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
        nworkers = max(1, len(client.scheduler_info().get("workers", {})))
    else:
        nworkers = workers
        # Ctrl-C is the client's to handle: it stops the run and the cluster. The worker processes start with
        # SIGINT ignored (inherited), so they do not each print a KeyboardInterrupt traceback on the way down.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            # Workers' own logs stay quiet below CRITICAL: what goes wrong in a task comes back to the client as
            # that sample's error, and at shutdown a worker's last heartbeat can race the closing scheduler and
            # log a traceback for nothing. The scheduler's HTTP server on any free local port: without an address
            # it takes 8787, and a second run on the machine printed a warning about the port being in use.
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       dashboard_address="127.0.0.1:0",
                                                       silence_logs=logging.CRITICAL))
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        client = stack.enter_context(Client(cluster))
    return client, as_completed, nworkers


@dataclass
class _Chain:
    ids: list[str]
    plans: list[StagePlan]


def _segments(plans: list[StagePlan]) -> list[list[StagePlan]]:
    """Consecutive sample-scope stages with the same batch size and the same samples (media kinds, label need) run
    as chained Dask tasks; a dataset-scope stage runs alone, after everything before it."""
    segments: list[list[StagePlan]] = []
    for plan in plans:
        last = segments[-1][-1].stage if segments else None
        stage = plan.stage
        if (last is not None and stage.scope == last.scope == "sample" and stage.batch_size == last.batch_size
                and stage.media_kinds == last.media_kinds and stage.needs_label == last.needs_label
                and plan.test_fold == segments[-1][-1].test_fold):
            segments[-1].append(plan)
        else:
            segments.append([plan])
    return segments


def run_pipeline(project: ProjectConfig, target: str | None = None, datasets: list[str] | None = None, *,
                 scheduler: str | None = None, workers: int | None = None, limit: int | None = None,
                 batch_size: int = 4, retry_failed: bool = False, progress: bool = True) -> RunReport:
    if target is not None and target not in STAGES and target != "index":
        raise ConfigError(f"unknown stage '{target}'; stages: index, {', '.join(STAGES)}")
    check_scheduler(scheduler)
    names = dataset_names(project, datasets)
    configs = {name: stage_configs(project, project.datasets[name]) for name in names}   # all checked first
    report = RunReport()
    with ExitStack() as stack:
        runner = _Runner(stack, scheduler, workers or os.cpu_count() or 1, batch_size, retry_failed, progress)
        for name in names:
            ds = project.datasets[name]
            index = ensure_index(project, ds)
            report.index[name] = index_counts(index)
            if target == "index":   # the annotations read, nothing else
                continue
            report.stages += runner.run_dataset(DatasetPlan(project, ds, index, target, configs[name]), limit)
        report.client_bytes = runner.client_bytes
    return report


class _Runner:
    def __init__(self, stack: ExitStack, scheduler: str | None, workers: int, batch_size: int, retry_failed: bool,
                 progress: bool):
        self.stack, self.scheduler, self.workers = stack, scheduler, workers
        self.batch_size, self.retry_failed, self.progress = batch_size, retry_failed, progress
        self.client: Any = None
        self.client_bytes = 0

    def _ensure_client(self) -> None:
        # Started only when there is work, so a rerun with nothing to do costs no cluster start-up.
        if self.client is None:
            self.client, self.as_completed, self.workers = _connect(self.scheduler, self.workers, self.stack)

    def _done(self, plan: DatasetPlan, stage: StagePlan, sid: str) -> bool:
        return plan.is_done(stage, sid, self.retry_failed)

    def run_dataset(self, plan: DatasetPlan, limit: int | None) -> list[StageReport]:
        population = plan.population(limit)
        kinds = {plan.samples[sid].media_kind for sid in population}
        reports = [StageReport(plan.dataset, p.name, p.key, total=len(plan.applicable(p, population)),
                               done_before=len(plan.done(p, population, self.retry_failed)),
                               stale=len(plan.stale(p, population)), note=p.stage.skip_note(kinds))
                   for p in plan.stages]
        for segment in _segments(plan.stages):
            first = plan.stages.index(segment[0])
            ready, blocked = plan.todo(segment, population, self.retry_failed)
            for position, count in blocked.items():
                reports[position].blocked += count
            if segment[0].stage.scope == "dataset":
                self._run_dataset_stage(plan, segment[0], ready.get(first, []), reports[first])
            elif ready:
                self._execute(plan, segment, ready, reports)
        for stage, rep in zip(plan.stages, reports):
            rep.failed_total = plan.count(stage, population, S.STATUS_FAILED)
        return reports

    def _run_dataset_stage(self, plan: DatasetPlan, stage_plan: StagePlan, pending: list[str],
                           report: StageReport) -> None:
        """Run a dataset-scope stage in this process: it learns from every sample of the dataset that is ready
        for it (whatever --limit says; its input digests name that set), and writes the pending ones. A stage
        with no inputs (an asset such as the FACS tables) runs once, when its store is empty."""
        stage = stage_plan.stage
        if stage.reads and not pending:
            return
        if not stage.reads and stage_plan.store.exists():
            return
        ready = plan.ready(stage_plan)
        digests = plan.expected(stage_plan)
        with stage_plan.store.lock():
            stage_plan.store.write_config(stage_plan.config)
            try:
                stage.setup()
                rows = stage.process_dataset(joined_rows(plan, stage_plan, ready, set(pending)))
            except (ValueError, ImportError, OSError) as e:  # a model that cannot load or does not fit the data
                raise ConfigError(f"stage '{stage.name}': {e}") from None
            for row in rows:
                row["input_digest"] = digests.get(row["sample_id"])
            stage_plan.store.write(rows)
        plan.record(stage_plan, rows)
        for row in rows:
            report.ok += row["status"] == S.STATUS_OK
            report.failed += row["status"] == S.STATUS_FAILED
        if not stage.reads:
            report.total = len(rows)

    def _execute(self, plan: DatasetPlan, segment: list[StagePlan], groups: dict[int, list[str]],
                 reports: list[StageReport]) -> None:
        if all(p.stage.runs_in_client() for p in segment):
            client, as_completed, workers = _InlineClient(), _InlineAsCompleted, 1
        else:
            self._ensure_client()
            client, as_completed, workers = self.client, self.as_completed, self.workers
        floors = {}
        for stage_plan in segment:
            self.stack.enter_context(stage_plan.store.lock())
            stage_plan.store.write_config(stage_plan.config)
            floors[stage_plan.name] = next_part_floor(stage_plan.store)
        stages = plan.stages
        end = stages.index(segment[-1]) + 1
        batch = segment[0].stage.batch_size or self.batch_size
        queue: deque[_Chain] = deque()
        for start, ids in sorted(groups.items()):
            # Tasks of up to TASK_ROWS samples (parts of a sensible size), but enough of them to keep every
            # worker busy; a whole number of batches.
            size = min(TASK_ROWS, max(batch, math.ceil(len(ids) / (4 * workers))))
            size = max(batch, size // batch * batch)
            for i in range(0, len(ids), size):
                queue.append(_Chain(ids[i:i + size], stages[start:end]))
        bars = {p.name: tqdm(total=sum(len(c.ids) for c in queue if p in c.plans), desc=f"{plan.dataset}/{p.name}",
                             unit="clip", disable=not self.progress, file=sys.stderr, leave=True)
                for p in segment}
        completed = as_completed()
        owner: dict[Any, _Chain] = {}
        max_in_flight = 2 * workers

        def submit_next() -> None:
            chain = queue.popleft()
            steps = []
            for stage_plan in chain.plans:
                stage = stage_plan.stage
                inputs = {up: None if any(p.stage.name == up for p in chain.plans[:chain.plans.index(stage_plan)])
                          else store_slice(plan, stage_plan, up, []) for up in stage.reads}
                expected = plan.expected(stage_plan)
                store = stage_plan.store
                steps.append(ChainStep(stage, stage_plan.key, (str(store.cache), store.dataset, store.stage, store.key),
                                       inputs, {sid: expected.get(sid) for sid in chain.ids}, floors[stage_plan.name]))
            # Resources only on an external cluster: a LocalCluster advertises none, and would wait forever.
            resources: dict[str, float] = {}
            if self.scheduler not in (None, "inline"):
                for stage_plan in chain.plans:
                    resources.update(stage_plan.stage.resources() or {})
            future = client.submit(run_chain, steps, chain.ids, batch, pure=False, resources=resources or None)
            owner[future] = chain
            completed.add(future)

        try:
            while queue and len(owner) < max_in_flight:
                submit_next()
            for future in completed:
                chain = owner.pop(future)
                try:
                    result = future.result()
                except StageSetupError as e:
                    raise ConfigError(str(e)) from None
                except Exception as e:  # noqa: BLE001 - a worker died: isolate the sample
                    self._recover(plan, chain, e, queue, reports, bars)
                else:
                    self.client_bytes += len(pickle.dumps(result))
                    self._record(plan, chain, result, reports, bars)
                    for sid in result.retry_alone:
                        remaining = [p for p in chain.plans if not self._done(plan, p, sid)]
                        if remaining:
                            queue.append(_Chain([sid], remaining))
                    if result.remaining:
                        queue.append(_Chain(result.remaining, chain.plans))
                while queue and len(owner) < max_in_flight:
                    submit_next()
        finally:
            for bar in bars.values():
                bar.close()
        for stage_plan in segment:
            # A run of small tasks (a few new samples at a time) leaves many small parts: merged here, under the
            # lock, so the store stays quick to scan.
            if stage_plan.store.needs_compaction():
                stage_plan.store.compact(small_only=True)
            stage_plan.store.save_index()

    def _record(self, plan: DatasetPlan, chain: _Chain, result: "ChainResult", reports: list[StageReport],
                bars: dict[str, tqdm]) -> None:
        for stage_plan, step in zip(chain.plans, result.steps):
            summary = step.part
            report = reports[plan.stages.index(stage_plan)]
            rows = 0
            if summary is not None:
                expected = plan.expected(stage_plan)
                stage_plan.store.record(summary, expected)
                plan.record(stage_plan, [{"sample_id": sid, "status": status, "input_digest": expected.get(sid)}
                                         for sid, status in zip(summary.ids, summary.statuses)])
                ok = sum(status == S.STATUS_OK for status in summary.statuses)
                report.ok += ok
                report.failed += len(summary.ids) - ok
                rows = len(summary.ids)
            # Samples of this chain that never reached this stage were blocked by an upstream failure.
            report.blocked += step.attempted - rows
            bars[stage_plan.name].update(step.attempted)

    def _write_failed(self, plan: DatasetPlan, stage_plan: StagePlan, sid: str, error: Exception,
                      report: StageReport, bars: dict[str, tqdm]) -> None:
        row = failed_row(sid, f"worker failed while processing this sample: {type(error).__name__}: {error}")
        row["input_digest"] = plan.expected(stage_plan).get(sid)
        stage_plan.store.write([row])
        plan.record(stage_plan, [row])
        report.failed += 1
        bars[stage_plan.name].update(1)

    def _recover(self, plan: DatasetPlan, chain: _Chain, error: Exception, queue: deque,
                 reports: list[StageReport], bars: dict[str, tqdm]) -> None:
        """A worker died (or the task could not run). Parts it renamed before dying are valid and found in the
        listing; retry each sample alone so one bad file cannot sink its neighbours, and record a sample that
        still kills its worker alone as failed, with the reason, at the first stage it has not done."""
        for p in chain.plans:
            plan.refresh(p)
        if len(chain.ids) > 1:
            for sid in chain.ids:
                remaining = [p for p in chain.plans if not self._done(plan, p, sid)]
                if remaining:
                    queue.append(_Chain([sid], remaining))
            return
        sid = chain.ids[0]
        remaining = [p for p in chain.plans if not self._done(plan, p, sid)]
        if remaining:
            self._write_failed(plan, remaining[0], sid, error, reports[plan.stages.index(remaining[0])], bars)


def store_slice(plan: DatasetPlan, stage_plan: StagePlan, upstream: str, ids: list[str]) -> "StoreSlice":
    store = plan.input_store(stage_plan, upstream)
    return StoreSlice(store.cache, store.dataset, store.stage, store.key, tuple(plan.columns(upstream)), tuple(ids))


def joined_rows(plan: DatasetPlan, stage_plan: StagePlan, ids: list[str],
                pending: set[str]) -> Iterator[dict[str, Any]]:
    """The stage's input rows for `ids`, streamed: the first upstream in `reads` part by part (it may hold
    images), the others looked up by sample id. Media paths come resolved against the dataset root."""
    stage = stage_plan.stage
    if not stage.reads:
        return
    upstreams = list(stage.reads)
    lookups = {}
    for upstream in upstreams[1:]:
        rows = plan.input_store(stage_plan, upstream).read(plan.columns(upstream), ids=ids).to_pylist()
        lookups[upstream] = {r["sample_id"]: r for r in rows}
    streamed = plan.input_store(stage_plan, upstreams[0])
    for table in streamed.iter_tables(["sample_id", *stage.reads[upstreams[0]]], ids=ids, status=S.STATUS_OK):
        for row in table.to_pylist():
            sid = row["sample_id"]
            for upstream, rows in lookups.items():
                row.update({c: rows[sid][c] for c in stage.reads[upstream]})
            row["pending"] = sid in pending
            yield resolve_media(row, stage.context.get("root"))
