"""What a dataset's stages must do under the current config: the one place that knows, per stage and sample,
what is done, stale, ready or blocked. The runner (dag.py), `status`, the Batch API export and the trainer's store
resolution all ask a `DatasetPlan` instead of working it out themselves.

Identity is split in two:
- A store key hashes what applies to every sample: stage name and version, the config values that change the
  output, the backend's identity (weights hash, prompt files) and the keys of the upstream stores. Not the index:
  its key holds the annotation files, and one relabelled row must not re-key every vision store. Not the dataset
  root either: a moved or copied project finds its stores.
- Each row carries an input digest of its own inputs: the index fields the stage reads (media paths relative to
  the root), the input digests of its upstream rows, and for a stage that learns from other samples (the
  cross-fitted emotions baseline) what it learnt from. A stored row is current when its digest is the one the
  current index gives; otherwise the sample is stale and counts as pending.
"""
from __future__ import annotations

import json
import sys
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc

from affectprep import schema as S
from affectprep.config import ConfigError, DatasetConfig, ProjectConfig, build_dataclass
from affectprep.store import Store, interned_strings, repeated_strings

from .datasets import DatasetAdapter, DatasetError, make_adapter
from .stage import Stage, cache_key, config_dict, digest, file_digest
from .stages import STAGES, stages_up_to

INDEX_VERSION = 2
# The index columns any stage may read, plus what decides whether a stage applies to a sample.
_INDEX_COLUMNS = ("media_kind", "label")


@dataclass
class StagePlan:
    stage: Stage
    key: str
    store: Store
    config: dict[str, Any]      # what is written beside the output: resolved config, identity, input keys
    # The evaluation fold this store serves, for stages made per test fold (the emotions baseline, and what is
    # built from its predictions): its predictions never saw that fold's test labels. None: one store for all.
    test_fold: int | None = None
    upstream: dict[str, "StagePlan"] = field(default_factory=dict)   # the plan of each store it reads

    @property
    def name(self) -> str:
        """The stage, and its test fold where it has one: "cate[fold 2]"."""
        return self.stage.name + (f"[fold {self.test_fold}]" if self.test_fold is not None else "")


def stage_configs(project: ProjectConfig, ds: DatasetConfig | None = None) -> dict[str, Any]:
    """Each stage's config dataclass, from its defaults, the project file's [stages], the dataset's own
    [datasets.NAME.stages] (when `ds` is given) and the overrides."""
    own = ds.stages if ds is not None else {}
    for where, tables in (("[stages]", project.stages), (f"[datasets.{ds.name}.stages]" if ds else "", own)):
        unknown = set(tables) - set(STAGES)
        if unknown:
            raise ConfigError(f"unknown stage(s) {sorted(unknown)} under {where}; known: {list(STAGES)}")
    return {name: build_dataclass(cls.Config, {**project.stages.get(name, {}), **own.get(name, {})},
                                  f"stages.{name}" if name not in own else f"datasets.{ds.name}.stages.{name}")
            for name, cls in STAGES.items()}


def index_store(project: ProjectConfig, ds: DatasetConfig) -> tuple[Store, DatasetAdapter, dict[str, Any]]:
    """The index store for the dataset as its annotations are now: key = adapter kind, options and the contents
    of the annotation files (named relative to the root), so a moved project finds it."""
    try:
        adapter = make_adapter(ds.kind, ds.root, ds.options)
        files = adapter.annotation_files()
    except (DatasetError, ValueError) as e:
        raise ConfigError(f"dataset '{ds.name}': {e}") from None
    config = {
        "stage": "index", "version": INDEX_VERSION, "kind": ds.kind, "options": config_dict(adapter.options),
        "annotations": {(p.relative_to(ds.root).as_posix() if p.is_relative_to(ds.root) else str(p)): file_digest(p)
                        for p in sorted(files)},
    }
    if adapter.version > 1:   # absent at version 1, so indexes built before adapters had versions keep their keys
        config["adapter_version"] = adapter.version
    return Store(project.cache, ds.name, "index", cache_key(config)), adapter, config


def plan_stages(project: ProjectConfig, index: Store, target: str | None, configs: dict[str, Any] | None = None,
                root: str | None = None) -> list[StagePlan]:
    """The stages up to `target` (all when None) with their store keys. `root`: the dataset root the stages
    resolve media paths against (not part of any key; default the project's)."""
    ds = project.datasets.get(index.dataset)
    configs = configs or stage_configs(project, ds)
    root = root or (str(ds.root) if ds is not None else None)
    meta = index.metadata()
    label_set = meta.get("affectprep.label_set")
    label_names = json.loads(meta.get("affectprep.label_names", "[]"))
    folds = dataset_folds(index)
    context = {"cache": str(project.cache), "dataset": index.dataset, "root": root, "label_set": label_set,
               "label_names": label_names, "folds": folds}
    plans: list[StagePlan] = []
    made: dict[str, dict[int | None, StagePlan]] = {}   # stage -> test fold -> plan
    for cls in stages_up_to(target):
        try:
            probe = cls(configs[cls.name])
            probe.context = dict(context)
            if not probe.enabled():
                if cls.name == target:
                    raise ConfigError(f"stage '{target}' has nothing to do: {probe.disabled_reason()}")
                continue
        except (ValueError, ImportError, OSError) as e:
            raise ConfigError(f"stages.{cls.name}: {e}") from None
        # One store per test fold for a stage made per fold, and for every stage that reads one.
        ups = [up for up in cls.reads if up != "index"]
        fold_ups = [up for up in ups if set(made[up]) != {None}]
        variants: list[int | None] = ((list(folds) if probe.per_test_fold and folds else [None]) if not fold_ups
                                      else sorted(made[fold_ups[0]]))
        made[cls.name] = {}
        for fold in variants:
            stage = probe if fold is None else cls(configs[cls.name])
            stage.context = {**context, "test_fold": fold}
            upstream = {up: made[up].get(fold) or made[up][None] for up in ups}
            try:
                identity = stage.identity()
            except (ValueError, ImportError, OSError) as e:
                raise ConfigError(f"stages.{cls.name}: {e}") from None
            config = {"stage": cls.name, "version": cls.version, "config": stage.keyed_config(),
                      "identity": identity, "inputs": {up: plan.key for up, plan in upstream.items()}}
            if cls.needs_label:   # the label ints mean what the label set says
                config["labels"] = {"label_set": label_set, "names": label_names}
            if fold is not None:
                config["test_fold"] = fold
            key = cache_key(config)
            store = Store(project.cache, index.dataset, cls.name, key)
            stage.context["store_path"] = str(store.path)
            made[cls.name][fold] = StagePlan(stage, key, store, config, fold, upstream)
            plans.append(made[cls.name][fold])
    return plans


def dataset_folds(index: Store) -> list[int]:
    """The official folds of a dataset (DFEW's 5, IEMOCAP's sessions, Oulu's subject folds); [] for a fixed
    split."""
    table = index.read(["fold"], status=S.STATUS_OK)
    return sorted({f for f in table.column("fold").to_pylist() if f})


def applies_to(stage: Stage, media_kind: str, label: int | None) -> bool:
    """Whether a stage has work for a sample of this media kind and label (-1 = none, as in AU-only data)."""
    if not stage.reads:  # an asset built from prompts/ alone, not from samples
        return False
    return media_kind in stage.media_kinds and (not stage.needs_label or (label is not None and label >= 0))


def _counts_as_done(status: str | None, retry_failed: bool) -> bool:
    """A current row counts as done when ok, or failed unless failures are to be retried."""
    return status == S.STATUS_OK or (status is not None and not retry_failed)


def _applies_key(stage: Stage) -> tuple:
    """What `applies_to` depends on: stages sharing it share one set of samples (every video, every label)."""
    return bool(stage.reads), tuple(sorted(stage.media_kinds)), stage.needs_label


class DatasetPlan:
    """One dataset's stages under the current config, and for each stage and sample: the input digest the current
    index gives, the stored row, and so whether the sample is done, stale, ready or blocked.

    Completion is read once per stage and kept up to date by `record()`; the expected digests of a stage that
    learns from other samples (and of the stages after it) depend on which samples are ready, so they are
    computed when first asked for, after the stages before have run."""

    def __init__(self, project: ProjectConfig, ds: DatasetConfig, index: Store, target: str | None = None,
                 configs: dict[str, Any] | None = None):
        self.dataset, self.index = ds.name, index
        self.stages = plan_stages(project, index, target, configs, root=str(ds.root))
        self.by_name = {p.name: p for p in self.stages}
        self._position = {p.name: i for i, p in enumerate(self.stages)}
        columns = sorted({c for p in self.stages for c in p.stage.reads.get("index", ())} | set(_INDEX_COLUMNS))
        table = index.read(["sample_id", *columns], status=S.STATUS_OK)
        values = [repeated_strings(table.column(c)) if c == "media_kind" else table.column(c).to_pylist()
                  for c in columns]
        # A named tuple per sample, not a dict: 300k samples' index fields cost a third of the memory.
        Sample = namedtuple("Sample", columns)
        self.samples: dict[str, Any] = {sid: Sample._make(row) for sid, row in
                                        zip(interned_strings(table.column("sample_id")), zip(*values))}
        self._stored: dict[str, dict[str, tuple[str, str | None]]] = {}
        self._expected: dict[str, dict[str, str | None]] = {}
        # Worked out once per stage (a 300k-sample dataset asks per sample many times): the samples a stage
        # applies to, and the status of each sample's current row.
        self._applies: dict[tuple, set[str]] = {}
        self._applicable_all: dict[tuple, list[str]] = {}
        self._current: dict[str, dict[str, str]] = {}
        self._sorted = sorted(self.samples)

    # ---- which samples -----------------------------------------------------------------------------------------

    def population(self, limit: int | None = None) -> list[str]:
        """The index's usable samples in id order, the first `limit` of them (all: one shared list, not to be
        changed)."""
        return self._sorted[:limit] if limit is not None else self._sorted

    def applies(self, plan: StagePlan, sid: str) -> bool:
        return sid in self._applying(plan)

    def _applying(self, plan: StagePlan) -> set[str]:
        key = _applies_key(plan.stage)
        if key not in self._applies:
            self._applies[key] = {sid for sid, sample in self.samples.items()
                                  if applies_to(plan.stage, sample.media_kind, sample.label)}
        return self._applies[key]

    def applicable(self, plan: StagePlan, population: list[str]) -> list[str]:
        """The samples of `population` the stage has work for (an asset's rows are not samples: its stored ids)."""
        if not plan.stage.reads:
            return list(self.stored(plan))
        applying = self._applying(plan)
        if population is not self._sorted:
            return [sid for sid in population if sid in applying]
        key = _applies_key(plan.stage)   # the whole population, asked for by every report: once per key
        if key not in self._applicable_all:
            self._applicable_all[key] = [sid for sid in population if sid in applying]
        return self._applicable_all[key]

    # ---- what is stored, and whether it is current -------------------------------------------------------------

    def stored(self, plan: StagePlan) -> dict[str, tuple[str, str | None]]:
        if plan.name not in self._stored:
            self._stored[plan.name] = plan.store.completion()
        return self._stored[plan.name]

    def status(self, plan: StagePlan, sid: str) -> str | None:
        """"ok" / "failed" for a current row, None when the sample has no row or only a stale one."""
        return self.current(plan).get(sid)

    def current(self, plan: StagePlan) -> dict[str, str]:
        """sample -> status of its current row (made from the inputs the current index gives)."""
        if plan.name not in self._current:
            stored = self.stored(plan)
            if not stored:   # nothing stored: no digests to work out (300k of them cost seconds)
                self._current[plan.name] = {}
            elif not plan.stage.reads:
                self._current[plan.name] = {sid: row[0] for sid, row in stored.items()}
            else:
                expected = self.expected(plan)
                self._current[plan.name] = {sid: row[0] for sid, row in stored.items() if row[1] == expected.get(sid)}
        return self._current[plan.name]

    def is_done(self, plan: StagePlan, sid: str, retry_failed: bool = False) -> bool:
        """The sample has a current row (a failed one counts unless `retry_failed`)."""
        return _counts_as_done(self.status(plan, sid), retry_failed)

    def done(self, plan: StagePlan, population: list[str], retry_failed: bool = False) -> dict[str, str]:
        """sample -> status of the current rows among `population` (failed ones left out with retry_failed)."""
        current = self.current(plan)
        return {sid: status for sid in self.applicable(plan, population)
                if _counts_as_done(status := current.get(sid), retry_failed)}

    def count(self, plan: StagePlan, population: list[str], status: str) -> int:
        """How many samples of `population` the stage applies to have a current row with `status`."""
        current = self.current(plan)
        return sum(current.get(sid) == status for sid in self.applicable(plan, population))

    def ready(self, plan: StagePlan, population: list[str] | None = None) -> list[str]:
        """The samples the stage applies to whose upstream rows are all current and ok (what a stage that learns
        from the dataset learns from)."""
        return [sid for sid in self.applicable(plan, self.population() if population is None else population)
                if self.upstream_ok(plan, sid)]

    def pending(self, plan: StagePlan, population: list[str] | None = None) -> list[str]:
        """Ready samples without a current ok row: what an export (the Batch API) sends."""
        return [sid for sid in self.ready(plan, population) if self.status(plan, sid) != S.STATUS_OK]

    def todo(self, segment: list[StagePlan], population: list[str], retry_failed: bool = False
             ) -> tuple[dict[int, list[str]], dict[int, int]]:
        """For a run of consecutive stages: the samples to start at each stage (by position in `stages`): the
        first stage of the segment they are not done for, when every stage before it is done and ok for them;
        and per stage the samples blocked there by an upstream stage that is not."""
        # Per stage: (position, the samples it applies to, their current statuses), looked up per sample.
        stages = [(self.stages.index(p), self._applying(p), self.current(p)) for p in segment]
        starts: dict[int, list[str]] = {}
        blocked: dict[int, int] = {}
        for sid in population:
            first = None
            for i, applying, current in stages:
                if sid in applying and not _counts_as_done(current.get(sid), retry_failed):
                    first = i
                    break
            if first is None:
                continue
            if self.upstream_ok(self.stages[first], sid):
                starts.setdefault(first, []).append(sid)
            else:
                blocked[first] = blocked.get(first, 0) + 1
        return starts, blocked

    def failed_or_blocked(self, population: list[str]) -> dict[str, tuple[set[str], set[str]]]:
        """Per stage name: the samples whose current row failed, and those without a row because a stage before
        failed (or was blocked) for them (what `status` reports)."""
        out: dict[str, tuple[set[str], set[str]]] = {}
        upstream: set[str] = set()
        for plan in self.stages:
            current = self.current(plan)
            if not plan.stage.reads:   # an asset: its rows are not samples, all of them count
                wanted = set(self.stored(plan))
            else:
                applying = self._applying(plan)
                wanted = applying if population is self._sorted else applying & set(population)
            failed = {s for s, status in current.items() if status == S.STATUS_FAILED and s in wanted}
            blocked = {s for s in upstream if s in wanted and s not in current}
            out[plan.name] = (failed, blocked)
            upstream |= failed | blocked
        return out

    def stale(self, plan: StagePlan, population: list[str]) -> list[str]:
        """Samples with a stored row made from other inputs than the current ones."""
        stored, current = self.stored(plan), self.current(plan)
        return [sid for sid in self.applicable(plan, population) if sid in stored and sid not in current]

    def upstream_ok(self, plan: StagePlan, sid: str) -> bool:
        """Every stage before `plan` that applies to the sample has a current ok row for it."""
        position = self._position[plan.name]
        return all(self.status(p, sid) == S.STATUS_OK for p in self.stages[:position] if self.applies(p, sid))

    def refresh(self, plan: StagePlan) -> None:
        """Read the stage's completion again from its store (parts a dead worker renamed before its reply)."""
        self._stored.pop(plan.name, None)
        self._current.pop(plan.name, None)

    def record(self, plan: StagePlan, rows: list[dict[str, Any]]) -> None:
        """Rows just written to the stage's store."""
        stored = self.stored(plan)
        current = self._current.get(plan.name)
        expected = self.expected(plan) if plan.stage.reads else {}
        for row in rows:
            sid, digest_ = row["sample_id"], row.get("input_digest")
            stored[sid] = (row["status"], digest_)
            if current is not None:
                if not plan.stage.reads or digest_ == expected.get(sid):
                    current[sid] = row["status"]
                else:
                    current.pop(sid, None)
        # What a stage after this one learns from (the samples ready for it) may have changed: its digests, and
        # those of the stages after it, are worked out again when next asked for.
        position = self.stages.index(plan)
        learner = next((i for i, p in enumerate(self.stages) if i > position and p.stage.scope == "dataset"
                        and p.stage.reads), None)
        if learner is not None:
            for p in self.stages[learner:]:
                self._expected.pop(p.name, None)
                self._current.pop(p.name, None)

    # ---- input digests -----------------------------------------------------------------------------------------

    def expected(self, plan: StagePlan) -> dict[str, str | None]:
        """sample -> the input digest its row must carry to be current."""
        if plan.name not in self._expected:
            self._expected[plan.name] = self._digests(plan)
        return self._expected[plan.name]

    def _digests(self, plan: StagePlan) -> dict[str, str | None]:
        stage = plan.stage
        if not stage.reads:
            return {}
        upstream = {up: self.expected(up_plan) for up, up_plan in plan.upstream.items()}
        index_columns = stage.reads.get("index", ())
        base: dict[str, str | None] = {}
        for sid, sample in self.samples.items():
            if not applies_to(stage, sample.media_kind, sample.label):
                continue
            parts: list[Any] = []
            for up in stage.reads:
                parts.append([getattr(sample, c) for c in index_columns] if up == "index"
                             else upstream[up].get(sid))
            base[sid] = sys.intern(digest(parts))   # one object with the store's copy (see store.interned_strings)
        if stage.scope != "dataset":
            return base
        # A stage that learns from other samples mixes in what it learns from: the samples ready for it.
        ready = [{**self.samples[sid]._asdict(), "sample_id": sid, "input_digest": d} for sid, d in base.items()
                 if self.upstream_ok(plan, sid)]
        return stage.input_digests(ready)

    # ---- reading inputs ----------------------------------------------------------------------------------------

    def input_store(self, plan: StagePlan, upstream: str) -> Store:
        """The store a stage reads as `upstream` (for a stage made per test fold: that fold's)."""
        return self.index if upstream == "index" else plan.upstream[upstream].store

    def columns(self, upstream: str) -> list[str]:
        """The columns of an upstream store that any planned stage reads (and the status)."""
        return sorted({c for p in self.stages for c in p.stage.reads.get(upstream, ())} | {"sample_id", "status"})


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


# ---- status ------------------------------------------------------------------------------------------------------

def describe(project: ProjectConfig, datasets: list[str] | None = None) -> list[dict[str, Any]]:
    """Per dataset and stage, for the current config: done / failed / blocked / pending (stale rows included)
    counts, store size and the failed samples with their errors. Reads stores only; builds and writes nothing."""
    out = []
    for name in dataset_names(project, datasets):
        ds = project.datasets[name]
        configs = stage_configs(project, ds)
        index, _, _ = index_store(project, ds)
        entry: dict[str, Any] = {"dataset": name, "kind": ds.kind, "root": str(ds.root), "stages": []}
        out.append(entry)
        if not index.exists():
            entry["index"] = None
            continue
        counts = index_counts(index)
        entry["index"] = {**counts, "key": index.key, "bytes": index.size_bytes(), "failures": _failures(index),
                          "corrupt_parts": [str(p) for p in index.corrupt_parts()]}
        plan = DatasetPlan(project, ds, index, None, configs)
        population = plan.population()
        outcomes = plan.failed_or_blocked(population)
        for stage in plan.stages:
            applies = plan.applicable(stage, population)
            failed, blocked = outcomes[stage.name]
            done = plan.count(stage, population, S.STATUS_OK)
            entry["stages"].append({
                "stage": stage.stage.name, "name": stage.name, "test_fold": stage.test_fold, "key": stage.key,
                "backend": stage.config["identity"].get("backend"),
                "total": len(applies), "done": done,
                "failed": len(failed), "blocked": len(blocked), "stale": len(plan.stale(stage, population)),
                "pending": len(applies) - done - len(failed) - len(blocked),
                "bytes": stage.store.size_bytes(),
                "failures": [f for f in _failures(stage.store) if f["sample_id"] in failed] if failed else [],
                "warnings": [w for w in _warnings(stage.store) if plan.status(stage, w["sample_id"]) == S.STATUS_OK],
                "corrupt_parts": [str(p) for p in stage.store.corrupt_parts()],
            })
    return out


def _failures(store: Store) -> list[dict[str, str]]:
    return store.read(["sample_id", "error"], status=S.STATUS_FAILED).to_pylist()


def _warnings(store: Store) -> list[dict[str, str]]:
    """The ok rows a stage flagged (sample_id, warning)."""
    table = store.read(["sample_id", "warning"], status=S.STATUS_OK)
    flagged = pc.fill_null(pc.not_equal(table.column("warning"), ""), False)
    return table.filter(flagged).to_pylist()
