"""Run the stages of a project as a Dask DAG, incrementally and resumably.

Per dataset: build (or reuse) the index, then for every sample find the first stage not yet done for the current
cache keys and submit a chain of tasks from there to the target stage, a few samples per chain. Tasks return rows;
the client writes them to the stores as they complete, so a killed run loses only what was in flight. Local runs
start an in-process LocalCluster; `scheduler="tcp://host:port"` uses an existing cluster; `scheduler="inline"` runs
everything in this process, one batch at a time, for debugging.
"""
from __future__ import annotations

import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from affectprep import schema as S
from affectprep.config import ConfigError, DatasetConfig, ProjectConfig, build_dataclass
from affectprep.store import Store

from .datasets import DatasetAdapter, DatasetError, index_table, make_adapter
from .stage import Stage, cache_key, config_dict, failed_row, file_digest
from .stages import STAGES, stages_up_to

INDEX_VERSION = 1


class StageSetupError(Exception):
    """A stage could not load its backend; every sample would fail the same way, so the run stops."""


@dataclass
class StageReport:
    dataset: str
    stage: str
    key: str
    total: int = 0          # samples this stage applies to (index-ok, right media kind, within --limit)
    done_before: int = 0    # already done for this key before the run
    ok: int = 0             # newly done in this run
    failed: int = 0         # newly failed in this run
    blocked: int = 0        # not attempted because an upstream stage failed for them
    failed_total: int = 0   # failed for this key, including earlier runs


@dataclass
class RunReport:
    stages: list[StageReport] = field(default_factory=list)
    index: dict[str, dict[str, Any]] = field(default_factory=dict)   # dataset -> ok / failed / excluded counts

    @property
    def failed(self) -> int:
        return sum(r["failed"] for r in self.index.values()) + sum(s.failed_total for s in self.stages)


# ---- planning ------------------------------------------------------------------------------------------------------

@dataclass
class StagePlan:
    stage: Stage
    key: str
    store: Store
    config: dict[str, Any]      # what is written beside the output: resolved config, identity, input keys


def stage_configs(project: ProjectConfig) -> dict[str, Any]:
    """Each stage's config dataclass, from its defaults, the project file and the overrides."""
    unknown = set(project.stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)} under [stages]; known: {list(STAGES)}")
    return {name: build_dataclass(cls.Config, project.stages.get(name, {}), f"stages.{name}")
            for name, cls in STAGES.items()}


def index_store(project: ProjectConfig, ds: DatasetConfig) -> tuple[Store, DatasetAdapter, dict[str, Any]]:
    """The index store for the dataset as its annotations are now (key = adapter, options, annotation contents)."""
    try:
        adapter = make_adapter(ds.kind, ds.root, ds.options)
        files = adapter.annotation_files()
    except (DatasetError, ValueError) as e:
        raise ConfigError(f"dataset '{ds.name}': {e}") from None
    config = {
        "stage": "index", "version": INDEX_VERSION, "kind": ds.kind, "root": str(ds.root),
        "options": config_dict(adapter.options),
        "annotations": {str(p.relative_to(ds.root) if p.is_relative_to(ds.root) else p): file_digest(p)
                        for p in sorted(files)},
    }
    return Store(project.cache, ds.name, "index", cache_key(config)), adapter, config


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


def plan_stages(project: ProjectConfig, index: Store, target: str | None,
                configs: dict[str, Any] | None = None) -> list[StagePlan]:
    configs = configs or stage_configs(project)
    keys = {"index": index.key}
    meta = index.metadata()
    context = {"cache": str(project.cache), "dataset": index.dataset,
               "label_set": meta.get("affectprep.label_set"),
               "label_names": json.loads(meta.get("affectprep.label_names", "[]"))}
    plans = []
    for cls in stages_up_to(target):
        try:
            stage = cls(configs[cls.name])
            if not stage.enabled():
                if cls.name == target:
                    raise ConfigError(f"stage '{target}' has nothing to do: {stage.disabled_reason()}")
                continue
            identity = stage.identity()
        except (ValueError, ImportError, OSError) as e:
            raise ConfigError(f"stages.{cls.name}: {e}") from None
        config = {"stage": cls.name, "version": cls.version, "config": config_dict(stage.config),
                  "identity": identity, "inputs": {up: keys[up] for up in cls.reads}}
        keys[cls.name] = cache_key(config)
        store = Store(project.cache, index.dataset, cls.name, keys[cls.name])
        stage.context = {**context, "store_path": str(store.path)}
        plans.append(StagePlan(stage, keys[cls.name], store, config))
    return plans


# ---- execution -----------------------------------------------------------------------------------------------------

_WORKER_STAGES: dict[str, Stage] = {}
_WORKER_STORES: dict[Path, Store] = {}


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
        # One Store per worker and path, so its cached map of which part holds each sample is built once.
        store = _WORKER_STORES.setdefault(path, Store(self.cache, self.dataset, self.stage, self.key))
        return store.read(list(self.columns), ids=self.ids).to_pylist()


def run_batch(stage: Stage, key: str, ids: list[str], inputs: dict[str, list[dict[str, Any]]]) -> list[dict]:
    """Runs on a worker: join the upstream rows of `ids`, process those whose upstream rows are all ok."""
    if key not in _WORKER_STAGES:
        try:
            stage.setup()
        except Exception as e:  # noqa: BLE001
            raise StageSetupError(f"stage '{stage.name}' could not start: {type(e).__name__}: {e}") from e
        _WORKER_STAGES[key] = stage
    stage = _WORKER_STAGES[key]
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
    return stage.process([by_id[sid] for sid in ids if sid in usable])


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


def _connect(scheduler: str | None, workers: int, stack: ExitStack) -> tuple[Any, Callable[[], Any], int]:
    if scheduler == "inline":
        return _InlineClient(), _InlineAsCompleted, 1
    from distributed import Client, LocalCluster, as_completed
    if scheduler:
        try:
            client = stack.enter_context(Client(scheduler, timeout="20s"))
        except OSError as e:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
        nworkers = max(1, len(client.scheduler_info().get("workers", {})))
    else:
        nworkers = workers
        cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                   dashboard_address=None, silence_logs=40))
        client = stack.enter_context(Client(cluster))
    return client, as_completed, nworkers


@dataclass
class _Chain:
    ids: list[str]
    plans: list[StagePlan]
    futures: list[Any] = field(default_factory=list)
    pending: int = 0
    broken: bool = False


def applies_to(stage: Stage, media_kind: str, label: int | None) -> bool:
    """Whether a stage has work for a sample of this media kind and label (-1 = none, as in AU-only data)."""
    if not stage.reads:  # an asset built from prompts/ alone, not from samples
        return False
    return media_kind in stage.media_kinds and (not stage.needs_label or (label is not None and label >= 0))


def _segments(plans: list[StagePlan]) -> list[list[StagePlan]]:
    """Consecutive sample-scope stages with the same batch size and the same samples (media kinds, label need) run
    as chained Dask tasks; a dataset-scope stage runs alone, after everything before it."""
    segments: list[list[StagePlan]] = []
    for plan in plans:
        last = segments[-1][-1].stage if segments else None
        stage = plan.stage
        if (last is not None and stage.scope == last.scope == "sample" and stage.batch_size == last.batch_size
                and stage.media_kinds == last.media_kinds and stage.needs_label == last.needs_label):
            segments[-1].append(plan)
        else:
            segments.append([plan])
    return segments


def run_pipeline(project: ProjectConfig, target: str | None = None, datasets: list[str] | None = None, *,
                 scheduler: str | None = None, workers: int | None = None, limit: int | None = None,
                 batch_size: int = 4, retry_failed: bool = False, progress: bool = True) -> RunReport:
    if target is not None and target not in STAGES:
        raise ConfigError(f"unknown stage '{target}'; stages: {', '.join(STAGES)}")
    names = dataset_names(project, datasets)
    configs = stage_configs(project)
    report = RunReport()
    with ExitStack() as stack:
        runner = _Runner(stack, scheduler, workers or os.cpu_count() or 1, batch_size, retry_failed, progress)
        for name in names:
            ds = project.datasets[name]
            index = ensure_index(project, ds)
            plans = plan_stages(project, index, target, configs)
            report.index[name] = index_counts(index)
            report.stages += runner.run_dataset(index, plans, limit)
    return report


def dataset_names(project: ProjectConfig, datasets: list[str] | None) -> list[str]:
    names = datasets or list(project.datasets)
    missing = [n for n in names if n not in project.datasets]
    if missing:
        raise ConfigError(f"unknown dataset(s) {missing}; the project has {sorted(project.datasets)}")
    if not names:
        raise ConfigError("the project has no datasets: add one with `affectprep init KIND --root PATH`")
    return names


def index_counts(index: Store) -> dict[str, Any]:
    statuses = list(index.statuses().values())
    excluded = json.loads(index.metadata().get("affectprep.excluded", "{}"))
    return {"ok": statuses.count(S.STATUS_OK), "failed": statuses.count(S.STATUS_FAILED), "excluded": excluded}


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

    def run_dataset(self, index: Store, plans: list[StagePlan], limit: int | None) -> list[StageReport]:
        idx = index.read(["sample_id", "media_kind", "label"], status=S.STATUS_OK)
        info = {sid: (kind, label) for sid, kind, label in zip(*(idx.column(c).to_pylist() for c in idx.column_names))}
        population = sorted(info)[:limit] if limit is not None else sorted(info)

        def applies(plan: StagePlan, sid: str) -> bool:
            return applies_to(plan.stage, *info[sid])

        reports, done = [], {}
        for plan in plans:
            statuses = plan.store.statuses()
            if self.retry_failed:
                statuses = {k: v for k, v in statuses.items() if v == S.STATUS_OK}
            done[plan.stage.name] = statuses
            applicable = [s for s in population if applies(plan, s)] if plan.stage.reads else list(statuses)
            reports.append(StageReport(index.dataset, plan.stage.name, plan.key, total=len(applicable),
                                       done_before=sum(s in statuses for s in applicable)))
        for segment in _segments(plans):
            first = plans.index(segment[0])
            # A sample can run from a stage when every earlier stage that applies to it is done and ok.
            ready: dict[int, list[str]] = {}
            for sid in population:
                todo = [plans.index(p) for p in segment if applies(p, sid) and sid not in done[p.stage.name]]
                if not todo:
                    continue
                upstream_ok = all(done[p.stage.name].get(sid) == S.STATUS_OK
                                  for p in plans[:todo[0]] if applies(p, sid))
                if upstream_ok:
                    ready.setdefault(todo[0], []).append(sid)
                else:
                    reports[todo[0]].blocked += 1
            if segment[0].stage.scope == "dataset":
                self._run_dataset_stage(index, plans, segment[0], ready.get(first, []), population, applies, done,
                                        reports[first])
            elif ready:
                self._execute(index, plans, segment, ready, done, reports)
        for plan, rep in zip(plans, reports):
            statuses = plan.store.statuses()
            rep.failed_total = sum(statuses.get(s) == S.STATUS_FAILED for s in population if applies(plan, s))
        return reports

    def _run_dataset_stage(self, index: Store, plans: list[StagePlan], plan: StagePlan, pending: list[str],
                           population: list[str], applies: Callable[[StagePlan, str], bool],
                           done: dict[str, dict[str, str]], report: StageReport) -> None:
        """Run a dataset-scope stage in this process: it learns from every ready sample, writes the pending ones.
        A stage with no inputs (an asset such as the FACS tables) runs once, when its store is empty."""
        if plan.stage.reads and not pending:
            return
        if not plan.stage.reads and plan.store.exists():
            return
        stage = plan.stage
        ready = [sid for sid in population if applies(plan, sid) and all(
            done[p.stage.name].get(sid) == S.STATUS_OK for p in plans[:plans.index(plan)] if applies(p, sid))]
        with plan.store.lock():
            plan.store.write_config(plan.config)
            try:
                stage.setup()
                rows = stage.process_dataset(joined_rows(index, plans, plan, ready, set(pending)))
            except (ValueError, ImportError, OSError) as e:  # a model that cannot load or does not fit the data
                raise ConfigError(f"stage '{stage.name}': {e}") from None
            plan.store.write(rows)
        for row in rows:
            done[stage.name][row["sample_id"]] = row["status"]
            report.ok += row["status"] == S.STATUS_OK
            report.failed += row["status"] == S.STATUS_FAILED
        if not stage.reads:
            report.total = len(rows)

    def _execute(self, index: Store, plans: list[StagePlan], segment: list[StagePlan], groups: dict[int, list[str]],
                 done: dict[str, dict[str, str]], reports: list[StageReport]) -> None:
        if all(p.stage.runs_in_client() for p in segment):
            client, as_completed, workers = _InlineClient(), _InlineAsCompleted, 1
        else:
            self._ensure_client()
            client, as_completed, workers = self.client, self.as_completed, self.workers
        for plan in segment:
            self.stack.enter_context(plan.store.lock())
            plan.store.write_config(plan.config)
        end = plans.index(segment[-1]) + 1
        batch = segment[0].stage.batch_size or self.batch_size
        queue: deque[_Chain] = deque()
        for start, ids in sorted(groups.items()):
            for i in range(0, len(ids), batch):
                queue.append(_Chain(ids[i:i + batch], plans[start:end]))
        bars = {p.stage.name: tqdm(total=sum(len(c.ids) for c in queue if p in c.plans), desc=f"{index.dataset}/"
                f"{p.stage.name}", unit="clip", disable=not self.progress, file=sys.stderr, leave=True)
                for p in segment}
        completed = as_completed()
        owner: dict[Any, tuple[_Chain, int]] = {}
        in_flight = 0
        max_in_flight = 2 * workers

        def submit_next() -> None:
            nonlocal in_flight
            chain = queue.popleft()
            produced: dict[str, Any] = {}
            for pos, plan in enumerate(chain.plans):
                inputs = {up: produced[up] if up in produced else store_slice(index, plans, up, chain.ids)
                          for up in plan.stage.reads}
                # Resources only on an external cluster: a LocalCluster advertises none, and would wait forever.
                resources = plan.stage.resources() if self.scheduler not in (None, "inline") else {}
                future = client.submit(run_batch, plan.stage, plan.key, chain.ids, inputs, pure=False,
                                       resources=resources or None)
                produced[plan.stage.name] = future
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
                plan = chain.plans[pos]
                if not chain.broken:
                    try:
                        rows = future.result()
                    except StageSetupError as e:
                        raise ConfigError(str(e)) from None
                    except Exception as e:  # noqa: BLE001 - a worker died or a task crashed: isolate the sample
                        chain.broken = True
                        self._recover(chain, pos, e, queue, done, reports, bars, plans)
                    else:
                        self._record(plan, rows, chain.ids, done, reports[plans.index(plan)], bars)
                if chain.pending == 0:
                    in_flight -= 1
                    chain.futures.clear()
                    while queue and in_flight < max_in_flight:
                        submit_next()
        finally:
            for bar in bars.values():
                bar.close()

    def _record(self, plan: StagePlan, rows: list[dict], ids: list[str], done: dict[str, dict[str, str]],
                report: StageReport, bars: dict[str, tqdm]) -> None:
        plan.store.write(rows)
        for row in rows:
            done[plan.stage.name][row["sample_id"]] = row["status"]
            if row["status"] == S.STATUS_OK:
                report.ok += 1
            else:
                report.failed += 1
        # Samples of this chain that never reached this stage were blocked by an upstream failure.
        report.blocked += len(ids) - len(rows)
        bars[plan.stage.name].update(len(ids))

    def _recover(self, chain: _Chain, pos: int, error: Exception, queue: deque, done: dict[str, dict[str, str]],
                 reports: list[StageReport], bars: dict[str, tqdm], plans: list[StagePlan]) -> None:
        """A task raised or its worker died. Retry each sample alone so one bad file cannot sink its neighbours;
        a sample that still fails alone is recorded as failed with the reason."""
        if len(chain.ids) > 1:
            for sid in chain.ids:
                remaining = [p for p in chain.plans if sid not in done[p.stage.name]]
                if remaining:
                    queue.append(_Chain([sid], remaining))
            return
        plan = chain.plans[pos]
        message = f"worker failed while processing this sample: {type(error).__name__}: {error}"
        self._record(plan, [failed_row(chain.ids[0], message)], chain.ids, done, reports[plans.index(plan)], bars)


def store_of(index: Store, plans: list[StagePlan], name: str) -> Store:
    return index if name == "index" else next(p.store for p in plans if p.stage.name == name)

def _columns(plans: list[StagePlan], upstream: str) -> list[str]:
    return sorted({c for p in plans for c in p.stage.reads.get(upstream, ())} | {"sample_id", "status"})


def read_rows(index: Store, plans: list[StagePlan], upstream: str, ids: list[str]) -> list[dict]:
    return store_of(index, plans, upstream).read(_columns(plans, upstream), ids=ids).to_pylist()


def store_slice(index: Store, plans: list[StagePlan], upstream: str, ids: list[str]) -> StoreSlice:
    store = store_of(index, plans, upstream)
    return StoreSlice(store.cache, store.dataset, store.stage, store.key, tuple(_columns(plans, upstream)),
                      tuple(ids))


def joined_rows(index: Store, plans: list[StagePlan], plan: StagePlan, ids: list[str],
                 pending: set[str]) -> Iterator[dict[str, Any]]:
    """The stage's input rows for `ids`, streamed: the first upstream in `reads` part by part (it may hold
    images), the others looked up by sample id."""
    if not plan.stage.reads:
        return
    upstreams = list(plan.stage.reads)
    lookups = {}
    for upstream in upstreams[1:]:
        rows = read_rows(index, plans, upstream, ids)
        lookups[upstream] = {r["sample_id"]: r for r in rows}
    streamed = store_of(index, plans, upstreams[0])
    for table in streamed.iter_tables(["sample_id", *plan.stage.reads[upstreams[0]]], ids=ids,
                                      status=S.STATUS_OK):
        for row in table.to_pylist():
            sid = row["sample_id"]
            for upstream, rows in lookups.items():
                row.update({c: rows[sid][c] for c in plan.stage.reads[upstream]})
            row["pending"] = sid in pending
            yield row


# ---- status ------------------------------------------------------------------------------------------------------

def describe(project: ProjectConfig, datasets: list[str] | None = None) -> list[dict[str, Any]]:
    """Per dataset and stage, for the current config: done / failed / blocked / pending counts, store size and
    the failed samples with their errors. Reads stores only; builds and writes nothing."""
    configs = stage_configs(project)
    out = []
    for name in dataset_names(project, datasets):
        ds = project.datasets[name]
        index, _, _ = index_store(project, ds)
        entry: dict[str, Any] = {"dataset": name, "kind": ds.kind, "root": str(ds.root), "stages": []}
        out.append(entry)
        if not index.exists():
            entry["index"] = None
            continue
        counts = index_counts(index)
        entry["index"] = {**counts, "key": index.key, "bytes": index.size_bytes(),
                          "failures": _failures(index)}
        idx = index.read(["sample_id", "media_kind", "label"], status=S.STATUS_OK).to_pylist()
        upstream_failed: set[str] = set()
        for plan in plan_stages(project, index, None, configs):
            statuses = plan.store.statuses()
            applies = ([r["sample_id"] for r in idx if applies_to(plan.stage, r["media_kind"], r["label"])]
                       if plan.stage.reads else list(statuses))   # an asset's rows are not samples
            done = sum(statuses.get(s) == S.STATUS_OK for s in applies)
            failed = {s for s in applies if statuses.get(s) == S.STATUS_FAILED}
            blocked = {s for s in applies if s in upstream_failed and s not in statuses}
            entry["stages"].append({
                "stage": plan.stage.name, "key": plan.key, "backend": plan.config["identity"].get("backend"),
                "total": len(applies), "done": done,
                "failed": len(failed), "blocked": len(blocked),
                "pending": len(applies) - done - len(failed) - len(blocked),
                "bytes": plan.store.size_bytes(), "failures": _failures(plan.store) if failed else [],
            })
            upstream_failed |= failed | blocked
    return out


def _failures(store: Store) -> list[dict[str, str]]:
    return store.read(["sample_id", "error"], status=S.STATUS_FAILED).to_pylist()
