"""OpenAI Batch API round trip for the text stages: export the pending requests of a stage as JSONL (the file the
Batch API, and `vllm run-batch`, take), and import the results file back into the stage's store. Batch requests
cost half as much, which matters for 60k clips."""
from __future__ import annotations

from pathlib import Path

from affectprep import schema as S
from affectprep.config import ConfigError, ProjectConfig

from .backends.llm_batch import export_batch_jsonl, import_batch_jsonl
from .dag import DatasetPlan, StagePlan, ensure_index, joined_rows
from .stages import TEXT_STAGES


def _pending(project: ProjectConfig, dataset: str, stage: str, test_fold: int | None = None
             ) -> tuple[StagePlan, list[dict]]:
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


def export_requests(project: ProjectConfig, dataset: str, stage: str, out: Path, test_fold: int | None = None) -> int:
    """Write the requests of every sample not yet done for the stage's current version; returns their count."""
    plan, rows = _pending(project, dataset, stage, test_fold)
    export_batch_jsonl(list(zip((r["sample_id"] for r in rows), plan.stage.requests(rows))), out)
    return len(rows)


def import_results(project: ProjectConfig, dataset: str, stage: str, results: Path,
                   test_fold: int | None = None) -> tuple[int, int]:
    """Store the answers of a Batch API results file as the stage's rows (refusals, empty and truncated answers
    become failed samples, as in a live run). Returns (ok, failed)."""
    plan, rows = _pending(project, dataset, stage, test_fold)
    prices = {model: tuple(price) for model, price in plan.stage.config.prices.items()}
    answers = import_batch_jsonl(results, prices=prices)
    rows = [r for r in rows if r["sample_id"] in answers]
    out = plan.stage.rows_from_answers(rows, [answers[r["sample_id"]] for r in rows])
    for row, source in zip(out, rows):
        row["input_digest"] = source["input_digest"]
    with plan.store.lock():
        plan.store.write_config(plan.config)
        plan.store.write(out)
    ok = sum(r["status"] == S.STATUS_OK for r in out)
    return ok, len(out) - ok
