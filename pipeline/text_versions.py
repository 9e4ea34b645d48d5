"""The side-by-side versions of the text stages: one store per (backend, model, prompt, generation parameters,
inputs), named by its cache key. Training picks one by that name."""
from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from affectprep import schema as S
from affectprep.config import ProjectConfig
from affectprep.store import Store, list_keys

from .dag import dataset_names, index_store, plan_stages
from .stages import TEXT_STAGES


def text_versions(project: ProjectConfig, datasets: list[str] | None = None) -> list[dict[str, Any]]:
    out = []
    for name in dataset_names(project, datasets):
        index, _, _ = index_store(project, project.datasets[name])   # read only: a read-only cache lists too
        current = {p.key for p in plan_stages(project, index, None)} if index.exists() else set()
        for stage in TEXT_STAGES:
            for key in list_keys(project.cache, name, stage):
                store = Store(project.cache, name, stage, key)
                written = store.read_config() or {}
                config = written.get("config", {})
                table = store.read(["status", "prompt_tokens", "completion_tokens", "cost_usd"])
                ok = table.filter(pc.equal(table.column("status"), S.STATUS_OK))
                total = lambda col: pc.sum(ok.column(col)).as_py() or 0  # noqa: E731
                out.append({"dataset": name, "stage": stage, "version": key,
                            "backend": config.get("captioner") or config.get("llm") or "?",
                            "prompt": config.get("prompt"), "ok": ok.num_rows, "failed": table.num_rows - ok.num_rows,
                            "prompt_tokens": total("prompt_tokens"), "completion_tokens": total("completion_tokens"),
                            "cost_usd": float(total("cost_usd")), "current": key in current,
                            "test_fold": written.get("test_fold")})
    return out
