"""Which stores a training run reads, resolved from the project config through the pipeline's own planning.

This is the one place where the pipeline and the trainer meet outside the schemas: the pipeline says which store
key the current config produces for each stage; the trainer only sees `Sources` (role -> store).
"""
from __future__ import annotations

import json
from typing import Any

from affectprep.config import ConfigError, ProjectConfig
from affectprep.labels import LABEL_SETS
from affectprep.labels import label_set as label_set_by_name
from affectprep.models.runs import Sources
from affectprep.pipeline.dag import index_store, plan_stages
from affectprep.pipeline.stage import cache_key
from affectprep.pipeline.stages import TEXT_STAGES
from affectprep.store import Store, list_keys


def resolve_sources(project: ProjectConfig, dataset: str, *, features: bool = False, text_version: str | None = None,
                    expression_set: str | None = None) -> Sources:
    """The stores of `dataset` for training. text_version: a key from `affectprep text list` (a CATE or a
    captions version), default the current CATE version. expression_set: for an AU dataset trained next to an
    expression dataset, that dataset's label set (it names the FACS prior between the two)."""
    if dataset not in project.datasets:
        raise ConfigError(f"unknown dataset '{dataset}'; the project has {sorted(project.datasets)}")
    index, _, _ = index_store(project, project.datasets[dataset])
    if not index.exists():
        raise ConfigError(f"dataset '{dataset}' has no index yet: run `affectprep run --dataset {dataset}` first")
    meta = index.metadata()
    label_set = meta.get("affectprep.label_set", "")
    label_names = json.loads(meta.get("affectprep.label_names", "[]"))
    plans = {p.stage.name: p for p in plan_stages(project, index, None)}
    stores: dict[str, Store] = {"index": index, "faces": plans["faces"].store, "facs": plans["facs"].store}
    if "audio" in plans:
        stores["audio"] = plans["audio"].store
    stores["texts"] = _text_store(project, dataset, plans, text_version)
    if features:
        # Disabled (unconfigured) stages are not in the plan; the model's data says which of these it needs.
        for stage in ("features", "audio_features"):
            if stage in plans:
                stores[stage] = plans[stage].store
        if not {"features", "audio_features"} & set(stores):
            raise ConfigError("--from features needs cached features: set stages.features.video_encoder (video), "
                              "or stages.audio_features.speech_encoder and .text_encoder (speech), and run that stage")
        text_plan = plans.get("text_features")
        if text_plan is not None:
            inputs = {"cate": stores["texts"].key}
            stores["text_features"] = Store(project.cache, dataset, "text_features",
                                            cache_key({**text_plan.config, "inputs": inputs}))
    # A dataset's own label set (kind = "csv") is an expression set named in its file, not one of ours.
    if label_set in LABEL_SETS and label_set_by_name(label_set).is_au:
        au_names = label_names
        facs_ids = {"au": label_set, **({"expression": expression_set, "prior": f"{expression_set}+{label_set}"}
                                        if expression_set else {})}
    else:
        au_names, facs_ids = [], {"expression": label_set}
    return Sources(dataset, label_names, stores, au_names, facs_ids)


def _text_store(project: ProjectConfig, dataset: str, plans: dict[str, Any], version: str | None) -> Store:
    if version is None:
        return plans["cate"].store
    for stage in TEXT_STAGES:   # a version key names one store of one of them
        if version in list_keys(project.cache, dataset, stage):
            return Store(project.cache, dataset, stage, version)
    raise ConfigError(f"no text version '{version}' for dataset '{dataset}': see `affectprep text list`")
