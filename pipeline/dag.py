"""Run the stages of a project as a Dask DAG, incrementally and resumably.

Per dataset: build (or reuse) the index, ask the dataset's plan (planner.py) which samples each stage still has
to do, and submit a chain of tasks from the first stage a sample needs to the target stage, a few samples per
chain. Tasks return rows; the client writes them to the stores as they complete, so a killed run loses only what
was in flight. Local runs start an in-process LocalCluster; `scheduler="tcp://host:port"` uses an existing
cluster; `scheduler="inline"` runs everything in this process, one batch at a time, for debugging.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from affectprep import schema as S
from affectprep.config import ConfigError, DatasetConfig, ProjectConfig
from affectprep.store import Store

from .datasets import DatasetError, index_table
from .planner import (DatasetPlan, StagePlan, applies_to, dataset_names, describe, index_counts, index_store,
                      plan_stages, stage_configs)
from .stage import Stage, failed_row
from .stages import STAGES

__all__ = ["DatasetPlan", "RunReport", "StagePlan", "StageReport", "applies_to", "dataset_names", "describe",
           "ensure_index", "index_store", "joined_rows", "plan_stages", "run_pipeline", "stage_configs"]


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

    @property
    def failed(self) -> int:
        return sum(r["failed"] for r in self.index.values()) + sum(s.failed_total for s in self.stages)


def ensure_index(project: ProjectConfig, ds: DatasetConfig) -> Store:
    """Build the index, and store the rows that are new or changed since the last run. The annotations are in the
    key, but the media are not (hashing 65k videos is too slow): a clip added or repaired since the last run turns
    from failed to ok here, and then counts as pending for the stages after."""
    store, adapter, config = index_store(project, ds)
    try:
        table = index_table(adapter)
    except DatasetError as e:
        raise ConfigError(f"dataset '{ds.name}': {e}") from None
    with store.lock():
        if not store.exists():
            store.write_config(config)
            store.write(table)
            return store
        # Compared as JSON text because unknown AUs are NaN, and NaN != NaN.
        stored = {row["sample_id"]: _canonical(row) for row in store.read().to_pylist()}
        changed = [i for i, row in enumerate(table.to_pylist()) if stored.get(row["sample_id"]) != _canonical(row)]
        if changed:
            store.write(table.take(changed))
    return store


def _canonical(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, default=str)


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
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       dashboard_address=None, silence_logs=40))
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        client = stack.enter_context(Client(cluster))
    return client, as_completed, nworkers


@dataclass
class _Chain:
    ids: list[str]
    plans: list[StagePlan]
    futures: list[Any] = field(default_factory=list)
    pending: int = 0
    broken: bool = False


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
    return report


class _Runner:
    def __init__(self, stack: ExitStack, scheduler: str | None, workers: int, batch_size: int, retry_failed: bool,
                 progress: bool):
        self.stack, self.scheduler, self.workers = stack, scheduler, workers
        self.batch_size, self.retry_failed, self.progress = batch_size, retry_failed, progress
        self.client: Any = None

    def _ensure_client(self) -> None:
        # Started only when there is work, so a rerun with nothing to do costs no cluster start-up.
        if self.client is None:
            self.client, self.as_completed, self.workers = _connect(self.scheduler, self.workers, self.stack)

    def _done(self, plan: DatasetPlan, stage: StagePlan, sid: str) -> bool:
        status = plan.status(stage, sid)
        return status == S.STATUS_OK or (status is not None and not self.retry_failed)

    def run_dataset(self, plan: DatasetPlan, limit: int | None) -> list[StageReport]:
        population = plan.population(limit)
        kinds = {plan.samples[sid]["media_kind"] for sid in population}
        reports = [StageReport(plan.dataset, p.name, p.key, total=len(plan.applicable(p, population)),
                               done_before=sum(self._done(plan, p, s) for s in plan.applicable(p, population)),
                               stale=len(plan.stale(p, population)), note=p.stage.skip_note(kinds))
                   for p in plan.stages]
        for segment in _segments(plan.stages):
            first = plan.stages.index(segment[0])
            # A sample can run from a stage when every earlier stage that applies to it is done and ok.
            ready: dict[int, list[str]] = {}
            for sid in population:
                todo = [plan.stages.index(p) for p in segment if plan.applies(p, sid) and not self._done(plan, p, sid)]
                if not todo:
                    continue
                if plan.upstream_ok(plan.stages[todo[0]], sid):
                    ready.setdefault(todo[0], []).append(sid)
                else:
                    reports[todo[0]].blocked += 1
            if segment[0].stage.scope == "dataset":
                self._run_dataset_stage(plan, segment[0], ready.get(first, []), reports[first])
            elif ready:
                self._execute(plan, segment, ready, reports)
        for stage, rep in zip(plan.stages, reports):
            rep.failed_total = sum(plan.status(stage, s) == S.STATUS_FAILED for s in plan.applicable(stage, population))
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
        ready = [sid for sid in plan.population() if plan.applies(stage_plan, sid) and plan.upstream_ok(stage_plan, sid)]
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
        for stage_plan in segment:
            self.stack.enter_context(stage_plan.store.lock())
            stage_plan.store.write_config(stage_plan.config)
        stages = plan.stages
        end = stages.index(segment[-1]) + 1
        batch = segment[0].stage.batch_size or self.batch_size
        queue: deque[_Chain] = deque()
        for start, ids in sorted(groups.items()):
            for i in range(0, len(ids), batch):
                queue.append(_Chain(ids[i:i + batch], stages[start:end]))
        bars = {p.name: tqdm(total=sum(len(c.ids) for c in queue if p in c.plans), desc=f"{plan.dataset}/{p.name}",
                             unit="clip", disable=not self.progress, file=sys.stderr, leave=True)
                for p in segment}
        completed = as_completed()
        owner: dict[Any, tuple[_Chain, int]] = {}
        in_flight = 0
        max_in_flight = 2 * workers

        def submit_next() -> None:
            nonlocal in_flight
            chain = queue.popleft()
            produced: dict[str, Any] = {}
            for pos, stage_plan in enumerate(chain.plans):
                stage = stage_plan.stage
                inputs = {up: produced[up] if up in produced else store_slice(plan, stage_plan, up, chain.ids)
                          for up in stage.reads}
                expected = plan.expected(stage_plan)
                digests = {sid: expected.get(sid) for sid in chain.ids}
                # Resources only on an external cluster: a LocalCluster advertises none, and would wait forever.
                resources = stage.resources() if self.scheduler not in (None, "inline") else {}
                future = client.submit(run_batch, stage, stage_plan.key, chain.ids, inputs, digests, pure=False,
                                       resources=resources or None)
                produced[stage.name] = future
                owner[future] = (chain, pos)
                chain.futures.append(future)
                completed.add(future)
            chain.pending = len(chain.plans)
            in_flight += 1

        try:
            while queue and in_flight < max_in_flight:
                submit_next()
            for future in completed:
                chain, pos = owner.pop(future)
                chain.pending -= 1
                stage_plan = chain.plans[pos]
                if not chain.broken:
                    try:
                        rows = future.result()
                    except StageSetupError as e:
                        raise ConfigError(str(e)) from None
                    except Exception as e:  # noqa: BLE001 - a worker died or a task crashed: isolate the sample
                        chain.broken = True
                        self._recover(plan, chain, pos, e, queue, reports, bars)
                    else:
                        self._record(plan, stage_plan, rows, chain.ids, reports[stages.index(stage_plan)], bars)
                if chain.pending == 0:
                    in_flight -= 1
                    chain.futures.clear()
                    while queue and in_flight < max_in_flight:
                        submit_next()
        finally:
            for bar in bars.values():
                bar.close()

    def _record(self, plan: DatasetPlan, stage_plan: StagePlan, rows: list[dict], ids: list[str],
                report: StageReport, bars: dict[str, tqdm]) -> None:
        stage_plan.store.write(rows)
        plan.record(stage_plan, rows)
        for row in rows:
            if row["status"] == S.STATUS_OK:
                report.ok += 1
            else:
                report.failed += 1
        # Samples of this chain that never reached this stage were blocked by an upstream failure.
        report.blocked += len(ids) - len(rows)
        bars[stage_plan.name].update(len(ids))

    def _recover(self, plan: DatasetPlan, chain: _Chain, pos: int, error: Exception, queue: deque,
                 reports: list[StageReport], bars: dict[str, tqdm]) -> None:
        """A task raised or its worker died. Retry each sample alone so one bad file cannot sink its neighbours;
        a sample that still fails alone is recorded as failed with the reason."""
        if len(chain.ids) > 1:
            for sid in chain.ids:
                remaining = [p for p in chain.plans if not self._done(plan, p, sid)]
                if remaining:
                    queue.append(_Chain([sid], remaining))
            return
        stage_plan, sid = chain.plans[pos], chain.ids[0]
        row = failed_row(sid, f"worker failed while processing this sample: {type(error).__name__}: {error}")
        row["input_digest"] = plan.expected(stage_plan).get(sid)
        self._record(plan, stage_plan, [row], chain.ids, reports[plan.stages.index(stage_plan)], bars)


def store_slice(plan: DatasetPlan, stage_plan: StagePlan, upstream: str, ids: list[str]) -> StoreSlice:
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
