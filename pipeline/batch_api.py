"""OpenAI Batch API round trip for the text stages: export the pending requests of a stage as JSONL (the file the
Batch API, and `vllm run-batch`, take), and import the results file back into the stage's store. Batch requests
cost half as much, which matters for 60k clips.

A request's custom_id is SAMPLE@VERSION (the first 12 characters of the text version's key), so a results file
says which version it answers even when the same samples were exported for several. Every export is also recorded
in the cache (batch_exports/DATASET/STAGE/ID.json: the version, each custom_id's sample and request hash). An
import stores answers only into the version they were exported for: results with custom_ids no export sent, with
one custom_id twice, or imported under other settings than the export's are refused whole, so a results file can
never become a second, wrongly labelled version."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affectprep import schema as S
from affectprep.config import ConfigError, ProjectConfig

from .backends.llm_batch import export_batch_jsonl, import_batch_jsonl
from .dag import DatasetPlan, StagePlan, ensure_index, joined_rows
from .stages import TEXT_STAGES


@dataclass
class ImportSummary:
    ok: int = 0
    failed: int = 0
    skipped_lines: list[str] = field(default_factory=list)   # "FILE:LINE: why", lines that are not results
    already_done: int = 0      # answers for samples this version already holds (an import run twice)
    inputs_changed: int = 0    # answers to requests whose inputs were redone since the export


def pending_requests(project: ProjectConfig, dataset: str, stage: str, test_fold: int | None = None
                     ) -> tuple[StagePlan, list[dict]]:
    """The plan of an openai:<model> text stage and the joined input rows of its samples not yet done."""
    if stage not in TEXT_STAGES:
        raise ConfigError(f"only the text stages {TEXT_STAGES} send LLM requests, not '{stage}'")
    if dataset not in project.datasets:
        raise ConfigError(f"unknown dataset '{dataset}'; the project has {sorted(project.datasets)}")
    ds = project.datasets[dataset]
    plan = DatasetPlan(project, ds, ensure_index(project, ds), stage)
    variants = {p.test_fold: p for p in plan.stages if p.stage.name == stage}
    if test_fold not in variants:
        folds = sorted(f for f in variants if f is not None)
        raise ConfigError(f"'{stage}' of dataset '{dataset}' has one version per test fold ({folds}): name one "
                          f"with --fold" if folds else f"'{stage}' of dataset '{dataset}' has no test folds: "
                          f"drop --fold")
    target = variants[test_fold]
    if getattr(target.stage, "kind", None) != "openai":
        raise ConfigError(f"stage '{stage}' uses '{target.stage.kind}', not an openai:<model> backend")
    pending = plan.pending(target)
    digests = plan.expected(target)
    rows = [{**row, "input_digest": digests.get(row["sample_id"])}
            for row in joined_rows(plan, target, pending, set(pending))]
    return target, rows


def _request_hash(request) -> str:
    return hashlib.sha256(json.dumps(request.body(), sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()[:24]


def _exports_folder(project: ProjectConfig, dataset: str, stage: str) -> Path:
    return Path(project.cache) / "batch_exports" / dataset / stage


def custom_id(sample_id: str, version: str) -> str:
    return f"{sample_id}@{version[:VERSION_CHARS]}"


VERSION_CHARS = 12


def export_requests(project: ProjectConfig, dataset: str, stage: str, out: Path, test_fold: int | None = None) -> int:
    """Write the requests of every sample not yet done for the stage's current version; returns their count."""
    plan, rows = pending_requests(project, dataset, stage, test_fold)
    requests = list(zip((custom_id(r["sample_id"], plan.key) for r in rows), plan.stage.requests(rows)))
    export_batch_jsonl(requests, out)
    record = {"dataset": dataset, "stage": stage, "version": plan.key, "test_fold": plan.test_fold,
              "config": plan.config["config"], "file": str(out), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "requests": {cid: _request_hash(request) for cid, request in requests},
              "samples": {cid: row["sample_id"] for (cid, _), row in zip(requests, rows)}}
    folder = _exports_folder(project, dataset, stage)
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(Path(out).read_bytes()).hexdigest()[:16]
    (folder / f"{name}.json").write_text(json.dumps(record, indent=1))
    return len(rows)


def _exports(project: ProjectConfig, dataset: str, stage: str) -> list[dict[str, Any]]:
    records = []
    for path in sorted(_exports_folder(project, dataset, stage).glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("requests"), dict):
            records.append(record)
    return records


def _settings_differ(exported: dict[str, Any], current: dict[str, Any], stage: str) -> str:
    diffs = [f"{stage}.{k} = {json.dumps(exported.get(k))} at export, {json.dumps(current.get(k))} now"
             for k in sorted(set(exported) | set(current)) if exported.get(k) != current.get(k)]
    return "; ".join(diffs[:4]) or "the prompt files, the inputs or the fold differ"


def _export_for(project: ProjectConfig, plan: StagePlan, ids: set[str], results: Path, stage: str,
                dataset: str) -> dict[str, Any]:
    """The export these results answer; ConfigError (nothing stored) when there is none, when some custom_ids
    were never exported, or when it was made for another version than the current settings make."""
    exports = [r for r in _exports(project, dataset, stage) if ids & set(r["requests"])]
    if not exports:
        raise ConfigError(f"{results}: none of its {len(ids)} custom_id(s) were exported by `affectprep text "
                          f"export-batch {stage} --dataset {dataset}`; import the results of such an export "
                          f"(nothing stored)")
    versions = sorted({r["version"] for r in exports})
    if len(versions) > 1:
        raise ConfigError(f"{results}: its custom_ids come from exports of several {stage} versions "
                          f"({', '.join(v[:10] for v in versions)}); import each export's results on their own "
                          f"(nothing stored)")
    best = max(reversed(exports), key=lambda r: len(ids & set(r["requests"])))
    unknown = sorted(ids - set(best["requests"]))
    if unknown:
        raise ConfigError(f"{results}: {len(unknown)} custom_id(s) were not in the export they came with (e.g. "
                          f"{', '.join(unknown[:3])}); fix the file or export again (nothing stored)")
    if best["version"] != plan.key:
        fold = f" --fold {best['test_fold']}" if best.get("test_fold") is not None else ""
        raise ConfigError(f"{results} answers the export of {stage} version {best['version'][:10]}, but the current "
                          f"settings make version {plan.key[:10]} "
                          f"({_settings_differ(best.get('config') or {}, plan.config['config'], stage)}): run "
                          f"import-batch with the options export-batch had (--set ...{fold}); nothing stored")
    return best


def import_results(project: ProjectConfig, dataset: str, stage: str, results: Path,
                   test_fold: int | None = None) -> ImportSummary:
    """Store the answers of a Batch API results file as the stage's rows (refusals, empty, truncated and
    oversized answers become failed samples, as in a live run; lines that are not results are skipped)."""
    plan, rows = pending_requests(project, dataset, stage, test_fold)
    config = plan.stage.config
    prices = {model: tuple(price) for model, price in config.prices.items()}
    read = import_batch_jsonl(results, prices=prices, max_tokens=config.max_tokens)
    if read.duplicates:
        raise ConfigError(f"{results}: custom_id {', '.join(read.duplicates[:3])} "
                          f"{'is' if len(read.duplicates) == 1 else 'are'} on more than one line; a results file "
                          f"answers each request once (nothing stored)")
    summary = ImportSummary(skipped_lines=read.skipped)
    if not read.answers:
        return summary
    export = _export_for(project, plan, set(read.answers), results, stage, dataset)
    sample_of = export.get("samples") or {cid: cid for cid in export["requests"]}
    answers = {sample_of[cid]: (cid, answer) for cid, answer in read.answers.items()}
    by_id = {r["sample_id"]: r for r in rows}
    summary.already_done = sum(sid not in by_id for sid in answers)
    todo = [by_id[sid] for sid in sorted(answers) if sid in by_id]
    current = dict(zip((r["sample_id"] for r in todo), map(_request_hash, plan.stage.requests(todo))))
    fresh = [r for r in todo if current[r["sample_id"]] == export["requests"][answers[r["sample_id"]][0]]]
    summary.inputs_changed = len(todo) - len(fresh)
    out = plan.stage.rows_from_answers(fresh, [answers[r["sample_id"]][1] for r in fresh])
    for row, source in zip(out, fresh):
        row["input_digest"] = source["input_digest"]
    if out:
        with plan.store.lock():
            plan.store.write_config(plan.config)
            plan.store.write(out)
    summary.ok = sum(r["status"] == S.STATUS_OK for r in out)
    summary.failed = len(out) - summary.ok
    return summary
