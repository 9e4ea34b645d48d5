"""Which stores a training run reads, resolved from the project config through the pipeline's own planning.

This is the one place where the pipeline and the trainer meet outside the schemas: the pipeline says which store
key the current config produces for each stage; the trainer only sees `Sources` (role -> store).
"""
from __future__ import annotations

import json
from typing import Any

from affectprep import schema as S
from affectprep.config import ConfigError, ProjectConfig
from affectprep.labels import LABEL_SETS
from affectprep.labels import label_set as label_set_by_name
from affectprep.models.runs import Sources
from affectprep.pipeline.dag import index_store, plan_stages
from affectprep.pipeline.stage import cache_key
from affectprep.pipeline.stages.emotions import checkpoint_saw
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
    plans = plan_stages(project, index, None)
    single = {p.stage.name: p for p in plans if p.test_fold is None}
    per_fold: dict[int, dict[str, Any]] = {}
    for p in plans:
        if p.test_fold is not None:
            per_fold.setdefault(p.test_fold, {})[p.stage.name] = p
    stores: dict[str, Store] = {"index": index, "faces": single["faces"].store, "facs": single["facs"].store}
    if "audio" in single:
        stores["audio"] = single["audio"].store
    fold_stores: dict[int, dict[str, Store]] = {}
    if text_version is not None:
        stores["texts"] = _text_store(project, dataset, text_version)
    elif "cate" in single:
        stores["texts"] = single["cate"].store
    else:   # one CATE version per test fold
        fold_stores = {fold: {"texts": stages["cate"].store} for fold, stages in per_fold.items()}
    if features:
        # Disabled (unconfigured) stages are not in the plan; the model's data says which of these it needs.
        for stage in ("features", "audio_features"):
            if stage in single:
                stores[stage] = single[stage].store
            elif (made := _made_without_config(project, dataset, stage, single)) is not None:
                stores[stage] = made
        if not {"features", "audio_features"} & set(stores):
            raise ConfigError("--from features needs cached features: set stages.features.video_encoder (video), "
                              "or stages.audio_features.speech_encoder and .text_encoder (speech), and run that stage")
        if "texts" in stores and ("text_features" in single or per_fold):
            text_plan = single.get("text_features") or next(iter(per_fold.values()))["text_features"]
            config = {k: v for k, v in text_plan.config.items() if k != "test_fold"}
            written = stores["texts"].read_config() or {}
            if "test_fold" in written:
                config["test_fold"] = written["test_fold"]
            stores["text_features"] = Store(project.cache, dataset, "text_features",
                                            cache_key({**config, "inputs": {"cate": stores["texts"].key}}))
        for fold, stages in per_fold.items():
            if fold in fold_stores and "text_features" in stages:
                fold_stores[fold]["text_features"] = stages["text_features"].store
    texts = [stores["texts"]] if "texts" in stores else [s["texts"] for s in fold_stores.values()]
    leaks = text_leaks(project, index, texts[0]) if "texts" in stores else {
        fold: leak for fold, s in fold_stores.items() if (leak := text_leaks(project, index, s["texts"]).get(fold))}
    # A dataset's own label set (kind = "csv") is an expression set named in its file, not one of ours.
    if label_set in LABEL_SETS and label_set_by_name(label_set).is_au:
        au_names = label_names
        facs_ids = {"au": label_set, **({"expression": expression_set, "prior": f"{expression_set}+{label_set}"}
                                        if expression_set else {})}
    else:
        au_names, facs_ids = [], {"expression": label_set}
    if au_names:   # AU data trains no text; its folds are its own (a separate --au-fold)
        fold_stores, leaks = {}, {}
    return Sources(dataset, label_names, stores, au_names, facs_ids, fold_stores=fold_stores, text_leaks=leaks)


def _made_without_config(project: ProjectConfig, dataset: str, stage: str, single: dict[str, Any]) -> Store | None:
    """The features a user made with `run --stage STAGE --set STAGE.ENCODER=...` while the project file leaves
    the stage unconfigured (the README's recipe): the one store of that stage built on the current upstream stores.
    Several such stores are ambiguous: the user names the encoder (`train --set STAGE.OPTION=...`)."""
    made = []
    for key in list_keys(project.cache, dataset, stage):
        store = Store(project.cache, dataset, stage, key)
        inputs = (store.read_config() or {}).get("inputs") or {}
        if store.exists() and inputs and all(up in single and single[up].key == k for up, k in inputs.items()):
            made.append(store)
    if len(made) > 1:
        encoders = sorted({json.dumps({k: v for k, v in (s.read_config() or {}).get("config", {}).items()
                                       if k.endswith("encoder") and v}) for s in made})
        raise ConfigError(f"dataset '{dataset}' has {len(made)} {stage} stores ({', '.join(encoders)}): say which "
                          f"with --set {stage}.OPTION=VALUE, as the run that made it did")
    return made[0] if made else None


def _text_store(project: ProjectConfig, dataset: str, version: str) -> Store:
    from affectprep.pipeline.text_versions import resolve_version   # its whole key or a unique prefix
    return resolve_version(project, dataset, version)


def text_leaks(project: ProjectConfig, index: Store, texts: Store) -> dict[int | None, str]:
    """For each test part of the dataset (each official fold; None: the fixed test split), why the texts of
    `texts` may carry its test labels: a prediction behind them came from a model that trained on one of its
    test samples (models.json of the emotions store lists what each model trained on). Captions carry none."""
    if texts.stage != "cate" or not texts.exists():   # captions carry no labels; no texts, nothing to carry
        return {}
    emotions_key = ((texts.read_config() or {}).get("inputs") or {}).get("emotions")
    if emotions_key is None:
        return {None: f"text version {texts.key} does not say which predictions it was built from"}
    emotions = Store(project.cache, texts.dataset, "emotions", emotions_key)
    try:
        models = json.loads((emotions.path / "models.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {None: f"the predictions behind text version {texts.key} do not list what their models trained on"}
    used = set(emotions.read(["model_id"], status=S.STATUS_OK).column("model_id").to_pylist())
    rows = index.read(["sample_id", "fold", "split"], status=S.STATUS_OK).to_pylist()
    folds = sorted({r["fold"] for r in rows if r["fold"]})
    parts = ({fold: [r for r in rows if r["fold"] == fold] for fold in folds} if folds
             else {None: [r for r in rows if r["split"] == "test"]})
    leaks = {}
    for part, test in parts.items():
        test_ids = {r["sample_id"] for r in test}
        for model_id in sorted(used):
            trained_on = models.get(model_id, {}).get("trained_on", "unknown")
            if isinstance(trained_on, list):
                seen = len(test_ids.intersection(trained_on))
            else:   # a user's checkpoint: what it says it saw
                seen = sum(map(checkpoint_saw(trained_on), test))
            if seen:
                where = f"fold {part}" if part is not None else "the test split"
                leaks[part] = (f"text version {texts.key} is built from predictions of '{model_id}', which trained "
                               f"on {seen} of {where}'s {len(test)} test samples")
                break
    return leaks
