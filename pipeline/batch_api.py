"""OpenAI Batch API round trip for the text stages: export the pending requests of a stage as JSONL (the file the
Batch API, and `vllm run-batch`, take), and import the results file back into the stage's store. Batch requests
cost half as much, which matters for 60k clips."""
from __future__ import annotations

from pathlib import Path

from affectprep import schema as S
from affectprep.config import ConfigError, ProjectConfig

from .backends.llm_batch import export_batch_jsonl, import_batch_jsonl
from .dag import StagePlan, applies_to, ensure_index, joined_rows, plan_stages
from .stages import TEXT_STAGES


def _pending(project: ProjectConfig, dataset: str, stage: str) -> tuple[StagePlan, list[dict]]:
    if stage not in TEXT_STAGES:
        raise ConfigError(f"only the text stages {TEXT_STAGES} send LLM requests, not '{stage}'")
    if dataset not in project.datasets:
        raise ConfigError(f"unknown dataset '{dataset}'; the project has {sorted(project.datasets)}")
    index = ensure_index(project, project.datasets[dataset])
    plans = plan_stages(project, index, stage)
    plan = plans[-1]
    if getattr(plan.stage, "kind", None) != "openai":
        raise ConfigError(f"stage '{stage}' uses '{plan.stage.kind}', not an openai:<model> backend")
    idx = index.read(["sample_id", "media_kind", "label"], status=S.STATUS_OK).to_pylist()
    ready = [r["sample_id"] for r in idx if applies_to(plan.stage, r["media_kind"], r["label"])]
    kinds = {r["sample_id"]: (r["media_kind"], r["label"]) for r in idx}
    for upstream in plans[:-1]:
        statuses = upstream.store.statuses()
        ready = [sid for sid in ready
                 if statuses.get(sid) == S.STATUS_OK or not applies_to(upstream.stage, *kinds[sid])]
    done = plan.store.statuses()
    pending = [sid for sid in ready if done.get(sid) != S.STATUS_OK]
    return plan, list(joined_rows(index, plans, plan, pending, set(pending)))


def export_requests(project: ProjectConfig, dataset: str, stage: str, out: Path) -> int:
    """Write the requests of every sample not yet done for the stage's current version; returns their count."""
    plan, rows = _pending(project, dataset, stage)
    export_batch_jsonl(list(zip((r["sample_id"] for r in rows), plan.stage.requests(rows))), out)
    return len(rows)


def import_results(project: ProjectConfig, dataset: str, stage: str, results: Path) -> tuple[int, int]:
    """Store the answers of a Batch API results file as the stage's rows (refusals, empty and truncated answers
    become failed samples, as in a live run). Returns (ok, failed)."""
    plan, rows = _pending(project, dataset, stage)
    prices = {model: tuple(price) for model, price in plan.stage.config.prices.items()}
    answers = import_batch_jsonl(results, prices=prices)
    rows = [r for r in rows if r["sample_id"] in answers]
    out = plan.stage.rows_from_answers(rows, [answers[r["sample_id"]] for r in rows])
    with plan.store.lock():
        plan.store.write_config(plan.config)
        plan.store.write(out)
    ok = sum(r["status"] == S.STATUS_OK for r in out)
    return ok, len(out) - ok
