"""The side-by-side versions of the text stages: one store per (backend, model, prompt, generation parameters,
inputs), named by its cache key. Training picks one by that name, or by a unique prefix of it."""
from __future__ import annotations

import json
import time
from typing import Any

import pyarrow.compute as pc

from affectprep import schema as S
from affectprep.config import ConfigError, ProjectConfig
from affectprep.store import Store, list_keys

from .dag import dataset_names, index_store, plan_stages
from .stages import TEXT_STAGES


def _made(store: Store) -> str | None:
    """When the version was made: its first part file, as UTC."""
    parts = store.parts()
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(parts[0].stat().st_mtime)) if parts else None


def version_info(store: Store, written: dict[str, Any] | None = None) -> dict[str, Any]:
    """What names a version for a person: backend, model, prompt, the captions it was built on, when made."""
    written = written if written is not None else (store.read_config() or {})
    config = written.get("config", {})
    backend = config.get("captioner") or config.get("llm") or "?"
    return {"dataset": store.dataset, "stage": store.stage, "version": store.key, "backend": backend,
            "model": backend.partition(":")[2], "prompt": config.get("prompt"),
            "built_on": (written.get("inputs") or {}).get("captions") if store.stage == "cate" else None,
            "test_fold": written.get("test_fold"), "made": _made(store)}


def text_versions(project: ProjectConfig, datasets: list[str] | None = None) -> list[dict[str, Any]]:
    out = []
    for name in dataset_names(project, datasets):
        index, _, _ = index_store(project, project.datasets[name])   # read only: a read-only cache lists too
        current = {p.key for p in plan_stages(project, index, None)} if index.exists() else set()
        for stage in TEXT_STAGES:
            for key in list_keys(project.cache, name, stage):
                store = Store(project.cache, name, stage, key)
                table = store.read(["status", "prompt_tokens", "completion_tokens", "cost_usd"])
                ok = table.filter(pc.equal(table.column("status"), S.STATUS_OK))
                total = lambda col: pc.sum(ok.column(col)).as_py() or 0  # noqa: E731
                out.append({**version_info(store), "ok": ok.num_rows, "failed": table.num_rows - ok.num_rows,
                            "prompt_tokens": total("prompt_tokens"), "completion_tokens": total("completion_tokens"),
                            "cost_usd": float(total("cost_usd")), "current": key in current})
    return out


def resolve_version(project: ProjectConfig, dataset: str, version: str,
                    stages: tuple[str, ...] = TEXT_STAGES) -> Store:
    """The text store named by `version`: its whole key or a unique prefix of it. ConfigError (one line) when
    none matches, or when the prefix names several (they are listed)."""
    version = version.strip()
    found = [(stage, key) for stage in stages for key in list_keys(project.cache, dataset, stage)
             if key.startswith(version)] if version else []
    exact = [(stage, key) for stage, key in found if key == version]
    if exact or len(found) == 1:
        stage, key = (exact or found)[0]
        return Store(project.cache, dataset, stage, key)
    if not found:
        raise ConfigError(f"no text version '{version}' for dataset '{dataset}': see `affectprep text list`")
    listed = ", ".join(f"{key} ({stage})" for stage, key in found[:8]) + (" ..." if len(found) > 8 else "")
    raise ConfigError(f"text version '{version}' is ambiguous for dataset '{dataset}': it begins "
                      f"{listed}; give more characters")


def sample_texts(project: ProjectConfig, sample_id: str, datasets: list[str] | None = None) -> list[dict[str, Any]]:
    """Every stored version's caption / CATE text (or its error) for one sample, with what names the version;
    one entry per dataset holding the sample. ConfigError when no dataset has it."""
    out = []
    for name in dataset_names(project, datasets):
        index, _, _ = index_store(project, project.datasets[name])
        if not index.exists():
            continue
        rows = index.read(["sample_id", "label"], ids=[sample_id]).to_pylist()
        if not rows:
            continue
        names = json.loads(index.metadata().get("affectprep.label_names", "[]"))
        label = rows[0]["label"]
        current = {p.key for p in plan_stages(project, index, None)}
        versions = []
        for stage in TEXT_STAGES:
            column = "caption" if stage == "captions" else "text"
            for key in list_keys(project.cache, name, stage):
                store = Store(project.cache, name, stage, key)
                found = store.read(["sample_id", "status", "error", column], ids=[sample_id]).to_pylist()
                if not found:
                    continue
                row = found[0]
                versions.append({**version_info(store), "current": key in current, "status": row["status"],
                                 "text": row[column], "error": row["error"]})
        out.append({"dataset": name, "sample_id": sample_id,
                    "label": names[label] if label is not None and 0 <= label < len(names) else None,
                    "versions": versions})
    if not out:
        where = f"dataset(s) {', '.join(datasets)}" if datasets else "any dataset's index"
        raise ConfigError(f"no sample '{sample_id}' in {where}: sample ids are the ones `affectprep status` lists")
    return out
