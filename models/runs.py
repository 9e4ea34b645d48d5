"""What a training run is made of, shared by the train, eval and explain recipes: its config, the stores it
reads, how its model and data loaders are built, and its folder.

    runs/<model>-<dataset>[-fold<k>]-<time>/
        config.json        the resolved TrainConfig (model options included) and the label names
        stores.json        every store read: dataset, stage and key per role, per task
        git.json           the commit (and whether the tree had uncommitted changes) of the code that trained
        metrics.json       one entry per epoch: losses, learning rate, throughput, test UAR/WAR (or AU F1)
        splits.json        the sample ids of train, validation and test, per task (models/splits.py)
        results.json       the test scores of the selected epoch ("selection": how it was chosen, on validation),
                           the last epoch's test scores ("last_epoch"), and the test samples it could not score
        selected-model.pt  the weights of the selected epoch (what eval and explain load)
        results-predictions.parquet   the selected epoch's test predictions: task, sample, label, prediction,
                           probabilities
        results-confusion.png, results-confusion.txt   its confusion matrix (results-<task>-confusion.* per task)
        checkpoints/epoch-NNN/   accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json

The stores are recorded by key, so `eval`, `explain` and `--resume` read exactly the data the run trained on,
whatever the project config says today.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from affectprep import schema as S
from affectprep.config import ConfigError, build_dataclass
from affectprep.store import Store

from .data import (ClipAugment, Refinement, Split, StoreAudio, StoreAudioFeatures, StoreClips, StoreFeatures,
                   StoreSamples, check_jitter, collate, select_samples, stratified_fraction)
from .recipes import recipe_for, with_overrides
from .registry import ModelInputs, model_builder, model_needs
from .splits import hold_out

SELECTED_WEIGHTS = "selected-model.pt"   # the model weights of the epoch results.json reports
ROLES = ("index", "faces", "texts", "features", "text_features", "facs", "audio")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run. A field left None takes the model's paper recipe (models/recipes.py; `resolved()`
    fills them in, and the run's config.json holds the resolved config); `model` holds the model builder's
    options (the recipe's model options are defaults under them)."""
    model_name: str = "grace"
    tiny: bool = False                     # the model's tiny test configuration
    model: dict[str, Any] = field(default_factory=dict)
    source: Literal["frames", "features"] = "frames"
    fold: int | None = None                # None: the dataset's fixed train/test split
    au_fold: int | None = None             # the AU dataset's own fold (SSM pairs them, Table XI); None: `fold`
    # SSM's data scaling (Fig. 5, Tables S1/S2): train on a seeded, stratified fraction of a task's training part.
    expression_fraction: float = 1.0
    au_fraction: float = 1.0
    target_labels: int | None = 5          # labelled training samples per class in a "target" domain (PCA); None: all
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    allow_leaky_text: bool = False         # train on texts that carry the test fold's labels (recorded)
    num_workers: int = 2                   # DataLoader workers per process
    shuffle_buffer: int = 256
    eval_every: int = 1                    # epochs between evaluations (the last epoch always evaluates)
    eval_views: int | None = None          # views per test sample (multi-view testing); None: every stored view
    # ---- from the recipe when None ----
    epochs: int | None = None
    batch_size: int | dict[str, Any] | None = None   # per optimiser step, all processes and accumulation steps:
                                           # one number for every task, or per task ({"au": 128})
    optimizer: Literal["adamw", "adam", "sgd"] | None = None
    lr: float | None = None                # the first parameter group's peak lr; the others keep their ratio to it
    group_lr: dict[str, Any] = field(default_factory=dict)   # one group's lr ({"visual_encoder": 1e-6})
    weight_decay: float | None = None      # every group's
    momentum: float | None = None          # sgd
    betas: tuple[float, float] | None = None   # adam, adamw
    eps: float | None = None
    layer_decay: float | None = None       # models that declare layer_decay (GRACE); 1 = none
    schedule: Literal["cosine", "step", "exponential"] | None = None
    warmup_epochs: float | None = None
    min_lr: float | None = None            # cosine: the floor, for the first group (the others keep their ratio)
    step_size: int | None = None           # step: epochs between decays
    gamma: float | None = None             # step, exponential: the decay factor
    clip_grad: float | None = None         # max gradient norm; 0: no clipping
    seed: int | None = None
    class_weighting: Literal["inverse_sqrt", "none"] | None = None
    scale: tuple[float, float] | None = None   # augmentation: area range of the random square crop
    flip: float | None = None
    erase: float | None = None
    color_jitter: tuple[float, float, float, float] | None = None   # brightness, contrast, saturation, hue
    rotation: float | None = None          # maximum rotation angle in degrees (GReFEL's heavy augmentation)
    # GReFEL's Data Refinement (§4): per epoch, N_pg images of each video or face group, then B per expression.
    refine_per_group: int | None = None    # N_pg; None: every image of a group
    refine_per_class: int | None = None    # B; None (with refine_per_group None too): no refinement
    selection: Literal["best_val", "last"] | None = None   # the reported epoch: best on validation, or the last
    val_fraction: float | None = None      # the validation hold-out of the training part (no official validation)

    def __post_init__(self) -> None:
        at_least = {"epochs": 1, "grad_accum": 1, "eval_every": 1, "num_workers": 0, "step_size": 1,
                    "shuffle_buffer": 0, "target_labels": 1, "eval_views": 1, "au_fold": 1,
                    "refine_per_group": 1, "refine_per_class": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"train.{name} must be at least {low}, got {value}")
        sizes = self.batch_size.values() if isinstance(self.batch_size, dict) else [self.batch_size]
        if not all(s is None or (isinstance(s, int) and not isinstance(s, bool) and s >= 1) for s in sizes):
            raise ConfigError(f"train.batch_size must be a positive number, or one per task, got {self.batch_size}")
        if isinstance(self.batch_size, dict) and set(self.batch_size) - {"expression", "au", "target"}:
            raise ConfigError(f"train.batch_size: tasks are expression, au and target, got {sorted(self.batch_size)}")
        rates = [self.lr, *self.group_lr.values()]
        if not all(r is None or (isinstance(r, (int, float)) and r > 0) for r in rates):
            raise ConfigError(f"train: learning rates must be positive, got lr={self.lr}, group_lr={self.group_lr}")
        for name in ("warmup_epochs", "weight_decay", "min_lr", "clip_grad", "momentum", "eps"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"train.{name} must not be negative, got {getattr(self, name)}")
        if self.gamma is not None and not 0 < self.gamma <= 1:
            raise ConfigError(f"train.gamma must lie in (0, 1], got {self.gamma}")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise ConfigError(f"train.val_fraction must lie in [0, 1), got {self.val_fraction}")
        try:
            check_jitter(self.color_jitter or (0.0, 0.0, 0.0, 0.0), self.rotation or 0.0)
        except ValueError as e:
            raise ConfigError(f"train: {e}") from None
        for name in ("expression_fraction", "au_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"train.{name} must lie in (0, 1], got {getattr(self, name)} (no data of a task: "
                                  f"train without its dataset)")
        scale = self.scale or (0.5, 1.0)
        if not (0 < scale[0] <= scale[1] <= 1 and 0 <= (self.flip or 0) <= 1 and 0 <= (self.erase or 0) <= 1):
            raise ConfigError(f"train: scale must be an area range inside (0, 1] and flip, erase probabilities, got "
                              f"scale={self.scale}, flip={self.flip}, erase={self.erase}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        return build_dataclass(cls, raw, "train")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    # ---- the recipe ------------------------------------------------------------------------------------------

    def resolved(self) -> "TrainConfig":
        """This config with every field left None taken from the model's recipe; batch_size one per task and
        group_lr one per recipe group. Idempotent."""
        recipe = recipe_for(self.model_name)
        groups = {g["name"]: g for g in recipe.param_groups}
        first = recipe.param_groups[0]
        unknown = set(self.group_lr) - set(groups)
        if unknown:
            raise ConfigError(f"train.group_lr: model '{self.model_name}' has parameter groups "
                              f"{', '.join(groups)}, not {', '.join(sorted(unknown))}")
        lr = self.lr if self.lr is not None else first["lr"]
        ratio = 1.0 if self.lr is None else lr / first["lr"]
        group_lr = {name: float(self.group_lr.get(name, g["lr"] if ratio == 1.0 else g["lr"] * ratio))
                    for name, g in groups.items()}
        sizes = dict(recipe.batch_size)
        if isinstance(self.batch_size, dict):
            sizes.update(self.batch_size)
        elif self.batch_size is not None:
            sizes = {task: self.batch_size for task in ("expression", "au", "target")}
        for task in ("expression", "au", "target"):   # a task the paper does not train takes the expression size
            sizes.setdefault(task, sizes["expression"])
        schedule = recipe.schedule
        pick = {"optimizer": recipe.optimizer, "momentum": recipe.momentum, "betas": recipe.betas,
                "eps": recipe.eps, "layer_decay": recipe.layer_decay, "schedule": schedule["kind"],
                "warmup_epochs": schedule["warmup_epochs"], "step_size": schedule["step_size"],
                "gamma": schedule["gamma"], "epochs": recipe.epochs, "class_weighting": recipe.class_weighting,
                "clip_grad": recipe.clip_grad, "seed": recipe.seed, "scale": tuple(recipe.augment["scale"]),
                "flip": recipe.augment["flip"], "erase": recipe.augment["erase"],
                "color_jitter": tuple(recipe.augment.get("color_jitter", (0.0, 0.0, 0.0, 0.0))),
                "rotation": recipe.augment.get("rotation", 0.0), "selection": recipe.selection,
                "val_fraction": recipe.val_fraction}
        values = {name: getattr(self, name) if getattr(self, name) is not None else default
                  for name, default in pick.items()}
        # The floor keeps its ratio to the peak, so a changed lr moves it too.
        min_lr = self.min_lr if self.min_lr is not None else schedule["min_lr"] * ratio
        if values["schedule"] == "step" and values["step_size"] is None or (
                values["schedule"] in ("step", "exponential") and values["gamma"] is None):
            raise ConfigError(f"train.schedule {values['schedule']} needs step_size (step) and gamma")
        if values["selection"] == "best_val" and values["val_fraction"] == 0:
            raise ConfigError("train.val_fraction = 0 leaves no validation part to select on: set selection = "
                              "\"last\" to report the last epoch")
        model = {**recipe.model_options, **self.model}
        return dataclasses.replace(self, lr=lr, group_lr=group_lr, batch_size=sizes, min_lr=min_lr, model=model,
                                   **values)

    def group_weight_decay(self) -> dict[str, float]:
        """Each recipe group's weight decay (`weight_decay` overrides every one)."""
        return {g["name"]: float(self.weight_decay if self.weight_decay is not None else g["weight_decay"])
                for g in recipe_for(self.model_name).param_groups}

    def batch_for(self, task: str) -> int:
        """Samples of `task` per optimiser step (a resolved config)."""
        return self.batch_size[task] if isinstance(self.batch_size, dict) else self.batch_size

    def recipe_json(self) -> dict[str, Any]:
        """The recipe as this (resolved) run trains it, in `recipe show --json` form; `sources` names the values
        that differ from the paper's recipe."""
        recipe = recipe_for(self.model_name)
        decay = self.group_weight_decay()
        values = {"optimizer": self.optimizer, "betas": list(self.betas) if self.betas else None, "eps": self.eps,
                  "momentum": self.momentum, "layer_decay": self.layer_decay,
                  "param_groups": [{"name": name, "lr": lr, "weight_decay": decay[name]}
                                   for name, lr in self.group_lr.items()],
                  "schedule": {"kind": self.schedule, "warmup_epochs": self.warmup_epochs, "min_lr": self.min_lr,
                               "step_size": self.step_size, "gamma": self.gamma},
                  "epochs": self.epochs, "batch_size": dict(self.batch_size), "class_weighting": self.class_weighting,
                  "clip_grad": self.clip_grad, "seed": self.seed,
                  "augment": {"scale": list(self.scale), "flip": self.flip, "erase": self.erase,
                              **({"color_jitter": list(self.color_jitter)} if "color_jitter" in recipe.augment
                                 or any(self.color_jitter) else {}),
                              **({"rotation": self.rotation} if "rotation" in recipe.augment or self.rotation
                                 else {})},
                  "model_options": {k: v for k, v in self.model.items() if k in recipe.model_options},
                  "selection": self.selection, "val_fraction": self.val_fraction}
        paper = json.loads(json.dumps(recipe.values()))
        mine = json.loads(json.dumps(values))
        changed = {key: "by [train] or --set" for key in paper if key in mine and _differs(paper[key], mine[key],
                                                                                             key)}
        return with_overrides(recipe, values, changed)


def _differs(paper: Any, mine: Any, key: str) -> bool:
    if key == "batch_size":   # the resolved sizes name every task; the paper's only those it trains
        return any(mine.get(task) != size for task, size in paper.items())
    return paper != mine


@dataclass
class Sources:
    """The stores one task of a run reads (role -> store; see ROLES), with the dataset's label names, and for
    models that take FACS knowledge the asset ids in the facs store."""
    dataset: str
    label_names: list[str]
    stores: dict[str, Store]
    au_names: list[str] = field(default_factory=list)
    facs_ids: dict[str, str] = field(default_factory=dict)   # "expression" / "au" / "prior" -> asset id
    # A dataset with official folds has texts (and their cached features) per test fold: fold -> role -> store.
    # `for_fold` puts the run's fold's into `stores`.
    fold_stores: dict[int, dict[str, Store]] = field(default_factory=dict)
    # Why the texts of a test fold (None: of the fixed split) may carry that fold's test labels, where they do
    # (predictions from models that trained on its test samples): the trainer refuses them unless allowed.
    text_leaks: dict[int | None, str] = field(default_factory=dict)
    test_fold: int | None = None
    leak_accepted: str | None = None   # the leak a run was told to accept, recorded in its stores.json

    def for_fold(self, fold: int | None) -> "Sources":
        """These sources for a run tested on `fold` (None: the fixed split; no per-fold texts then)."""
        if not self.fold_stores or fold is None:
            return dataclasses.replace(self, test_fold=fold)
        if fold not in self.fold_stores:
            raise ConfigError(f"dataset '{self.dataset}' has no fold {fold}; its folds are {sorted(self.fold_stores)}")
        return dataclasses.replace(self, stores={**self.stores, **self.fold_stores[fold]}, test_fold=fold)

    def check_texts(self, allow_leak: bool) -> "Sources":
        """Refuse texts that carry the test labels of this run's fold, unless `allow_leak` (then recorded)."""
        leak = self.text_leaks.get(self.test_fold)
        if leak is None:
            return self
        if not allow_leak:
            raise ConfigError(f"the texts of dataset '{self.dataset}' for this run carry test labels: {leak}; "
                              f"use the default per-fold CATE versions (stages.emotions.protocol = \"per_fold\"), "
                              f"or --set allow_leaky_text=true to accept it (recorded in the run folder)")
        return dataclasses.replace(self, leak_accepted=leak)

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "label_names": self.label_names, "au_names": self.au_names,
                "facs_ids": self.facs_ids, "test_fold": self.test_fold, "leak_accepted": self.leak_accepted,
                "stores": {role: {"cache": str(s.cache), "dataset": s.dataset, "stage": s.stage, "key": s.key}
                           for role, s in self.stores.items()}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Sources":
        stores = {role: Store(Path(s["cache"]), s["dataset"], s["stage"], s["key"]) for role, s in raw["stores"].items()}
        return cls(raw["dataset"], raw["label_names"], stores, raw.get("au_names", []), raw.get("facs_ids", {}),
                   test_fold=raw.get("test_fold"), leak_accepted=raw.get("leak_accepted"))

    def store(self, role: str) -> Store:
        if role not in self.stores:
            if any(role in stores for stores in self.fold_stores.values()):
                raise ConfigError(f"dataset '{self.dataset}' has official folds, and one text version per test "
                                  f"fold: train with --fold K (one of {sorted(self.fold_stores)}) or --fold all")
            raise ConfigError(f"this run needs the {role} store of dataset '{self.dataset}', and none was given")
        store = self.stores[role]
        if not store.exists():
            raise ConfigError(f"{store} does not exist: run `affectprep run` for dataset '{self.dataset}' first")
        return store

    def facs(self) -> dict[str, dict[str, Any]]:
        """The FACS asset rows the model takes: {"expression": row, "au": row, "prior": row} (those present)."""
        table = self.store("facs").read(ids=list(self.facs_ids.values()), status=S.STATUS_OK)
        rows = {row["sample_id"]: row for row in table.to_pylist()}
        missing = [a for a in self.facs_ids.values() if a not in rows]
        if missing:
            raise ConfigError(f"the facs asset has no {missing}; known: {sorted(rows)}")
        return {part: rows[asset] for part, asset in self.facs_ids.items()}


# ---- the model ---------------------------------------------------------------------------------------------------

def build_model(config: TrainConfig, sources: dict[str, Sources]) -> nn.Module:
    """The registered model with the run's options, sized to the data: classes, AUs, and what the model declared
    it needs (registry NEEDS): class names, the FACS asset, cached features."""
    try:
        builder, needs = model_builder(config.model_name), model_needs(config.model_name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    options = dict(config.model)
    if "tasks" in needs and "tasks" not in options:
        # A model of several tasks that can learn one alone (SSM's STL rows) learns those the run has data for:
        # an expression dataset without an AU dataset trains expressions only, and the reverse.
        options["tasks"] = [task for task in sources if task in ("expression", "au")]
        if len(options["tasks"]) == 1:
            options.setdefault("dpm", False)   # DPM maps between the two tasks' prototypes
    expression = sources.get("expression")
    if expression is not None:
        options.setdefault("num_classes", len(expression.label_names))
        if "class_names" in needs:
            options.setdefault("class_names", list(expression.label_names))
    if "facs" in needs and any(s.facs_ids for s in sources.values()):
        options.setdefault("facs", _merged_facs(sources))
    if config.source == "features":
        main = next(iter(sources.values()))
        if "video_features" in needs:         # video models: cached VideoMAE tokens (and text tokens)
            options.update(video_features=True, text_features="text_features" in main.stores)
            # The token grid and width are those of the encoder that made the cache.
            options.setdefault("video_encoder", _encoder_of(main.store("features"), "video_encoder"))
            if "text_features" in main.stores:
                options.setdefault("text_dim", _last_dim(main.store("text_features"), "text_shape"))
        elif "speech_features" in needs:      # speech models: cached speech and transcript tokens
            audio = main.store("audio_features")
            options.update(features=True, audio_dim=_last_dim(audio, "audio_shape"),
                           text_dim=_last_dim(audio, "text_shape"))
        else:
            raise ConfigError(f"model '{config.model_name}' cannot train from cached features; use --from frames")
    try:
        return builder(tiny=config.tiny, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model '{config.model_name}': {e}") from None


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch with every tensor on `device` (the registry's device rule: the trainer, eval and explain
    move batches; models never do)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _merged_facs(sources: dict[str, Sources]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for task_sources in sources.values():
        if task_sources.facs_ids:
            merged.update(task_sources.facs())
    return merged


def _encoder_of(features: Store, name: str) -> str:
    encoder = json.loads(_first_value(features, "encoders")).get(name)
    if not encoder:
        raise ConfigError(f"{features} holds no {name} output: set stages.features.{name} and run the features stage")
    return encoder


def _last_dim(store: Store, column: str) -> int:
    """The width of the cached arrays in `column` (the last entry of a stored shape)."""
    return int(_first_value(store, column)[-1])


def _first_value(store: Store, column: str) -> Any:
    """`column` of the store's first ok row: what every row of a features store shares (encoders, width)."""
    for table in store.iter_tables([column], status=S.STATUS_OK):
        if table.num_rows:
            return table.column(column)[0].as_py()
    raise ConfigError(f"{store} holds no features: run the {store.stage} stage")


# ---- the data ----------------------------------------------------------------------------------------------------

def folds_of(sources: Sources) -> list[int]:
    """The official folds of a dataset's index (IEMOCAP: its sessions); empty for a fixed-split dataset."""
    folds = sources.store("index").read(["fold"], status=S.STATUS_OK).column("fold").to_pylist()
    return sorted({f for f in folds if f})


def task_fold(config: TrainConfig, task: str) -> int | None:
    """The official fold `task` tests on: an AU dataset's own `au_fold` where given (SSM pairs an expression fold
    with an AU fold independently, §IV-D and Table XI), else the run's `fold`."""
    return config.au_fold if task == "au" and config.au_fold is not None else config.fold


def samples_for(sources: Sources, config: TrainConfig, part: str, task: str) -> list[dict]:
    """The index rows of one of a run's three disjoint parts of a task (models/splits.py): "train", "validation"
    or "test", on the task's fold (task_fold). The config's val_fraction and seed (the recipe's where unset) draw
    the hold-out.
    A task the recipe does not select on (selection_metric) has no validation part and keeps its whole training
    part. The task's fraction (expression_fraction, au_fraction) thins its training part after the hold-out, so
    validation and test are never thinned."""
    if part not in ("train", "validation", "test"):
        raise ValueError(f"unknown part {part!r}; choose train, validation or test")
    config = config.resolved()
    index, fold = sources.store("index"), task_fold(config, task)
    try:
        if part == "test":
            return select_samples(index, Split(fold), "test", task)
        training = select_samples(index, Split(fold), "train", task)
        official = [] if fold is not None else select_samples(index, Split(None), "val", task)
    except ValueError as e:
        hint = ("; choose the AU dataset's fold with --au-fold J (train.au_fold)"
                if task == "au" and config.au_fold is None else "")
        raise ConfigError(f"{e}{hint}") from None
    if official:
        train, validation = training, official
    elif task not in selection_tasks(config) or config.selection == "last" and not config.val_fraction:
        train, validation = training, []
    else:
        train, validation = hold_out(training, config.val_fraction, config.seed)
    if part == "validation":
        return validation
    fraction = {"expression": config.expression_fraction, "au": config.au_fraction}.get(task, 1.0)
    return stratified_fraction(train, fraction, config.seed)


def selection_tasks(config: TrainConfig) -> dict[str, str]:
    """task -> the metric the validation-selected epoch maximises (the recipe's selection_metric)."""
    return dict(recipe_for(config.model_name).selection_metric)


def texts_for(sources: Sources, samples: list[dict]) -> dict[str, str]:
    """sample_id -> text of the run's text version (a CATE text, or a caption), for the given samples."""
    store = sources.store("texts")
    column = "caption" if store.stage == "captions" else "text"
    table = store.read(["sample_id", column], ids=[s["sample_id"] for s in samples], status=S.STATUS_OK)
    return dict(zip(table.column("sample_id").to_pylist(), table.column(column).to_pylist()))


def make_dataset(model: nn.Module, config: TrainConfig, sources: Sources, samples: list[dict], *, train: bool,
                 rank: int = 0, world_size: int = 1, view: int | None = 0,
                 max_views: int | None = None) -> StoreSamples:
    """The streaming dataset a model needs (see ModelInputs): aligned clips or images (with landmarks, texts) from
    the faces store, or cached features. view=None with max_views: the first max_views views of each sample."""
    try:
        return _dataset(model.inputs, config, sources, samples, train=train, rank=rank, world_size=world_size,
                        view=view, max_views=max_views)
    except ValueError as e:   # the stores do not hold what this model needs
        raise ConfigError(f"dataset '{sources.dataset}': {e}") from None


def _dataset(inputs: ModelInputs, config: TrainConfig, sources: Sources, samples: list[dict], *, train: bool,
             rank: int, world_size: int, view: int | None, max_views: int | None) -> StoreSamples:
    refine = (Refinement(config.refine_per_class, config.refine_per_group)
              if train and (config.refine_per_class or config.refine_per_group) else None)
    common = dict(view=view, max_views=max_views, shuffle_buffer=config.shuffle_buffer if train else 0,
                  seed=config.seed, rank=rank, world_size=world_size, drop_remainder=train, refine=refine)
    cached_text = config.source == "features" and "text_features" in sources.stores
    texts = texts_for(sources, samples) if inputs.text == "caption" and not cached_text else None
    if config.source == "features" and inputs.audio:
        return StoreAudioFeatures(sources.store("audio_features"), samples, **common)
    if config.source == "features":
        return StoreFeatures(sources.store("features"), samples, texts=texts,
                             text_features=sources.store("text_features") if cached_text else None, **common)
    if inputs.audio:
        return StoreAudio(sources.store("audio"), samples, train=train, **common)
    if train and inputs.real_landmarks:
        _require_real_landmarks(sources.store("faces"), samples, config.model_name)
    augment = ClipAugment(size=inputs.image_size, train=train, scale=config.scale, flip=config.flip,
                          erase=config.erase, mean=inputs.mean, std=inputs.std, color_jitter=config.color_jitter,
                          rotation=config.rotation)
    return StoreClips(sources.store("faces"), samples, augment=augment, landmarks=inputs.landmarks, texts=texts,
                      num_frames=inputs.frames, **common)


def _require_real_landmarks(faces: Store, samples: list[dict], model_name: str) -> None:
    """Refuse to train a model that learns from landmark geometry (ModelInputs.real_landmarks) on landmarks that
    are the mean-shape template placed by the eyes (the haar and center_crop face backends). make_dataset turns
    the ValueError into a ConfigError naming the dataset."""
    table = faces.read(["landmark_source"], ids=[s["sample_id"] for s in samples], status=S.STATUS_OK)
    if "template" in set(table.column("landmark_source").to_pylist()):
        raise ValueError(f"its faces store holds template landmarks (the mean shape placed by the eyes, "
                         f"landmark_source 'template'), which give {model_name} no facial geometry to learn: rebuild "
                         f"the faces with a landmark detector (stages.faces.backend = \"fan\"), or train on them "
                         f"anyway with --set model.allow_template_landmarks=true")


def make_loader(dataset: StoreSamples, batch_size: int, num_workers: int) -> DataLoader:
    # Not prepared by accelerate: the dataset shards by rank itself (see models/data.py).
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=False)


# ---- the run folder ----------------------------------------------------------------------------------------------

class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_json(self, name: str, value: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(value, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, self.path / name)

    def read_json(self, name: str) -> Any:
        path = self.path / name
        if not path.exists():
            raise ConfigError(f"{self.path} is not a training run folder (no {name})")
        return json.loads(path.read_text())

    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.read_json("config.json")["train"]).resolved()

    def sources(self) -> dict[str, Sources]:
        return {task: Sources.from_json(raw) for task, raw in self.read_json("stores.json").items()}

    def finished_checkpoints(self) -> list[Path]:
        """Checkpoint folders whose save completed (trainer_state.json is written last), oldest first."""
        return sorted(p for p in self.checkpoints.glob("epoch-*") if (p / "trainer_state.json").exists())

    def latest_checkpoint(self) -> Path | None:
        done = self.finished_checkpoints()
        return done[-1] if done else None

    def finish_checkpoint(self, checkpoint: Path, epoch: int) -> None:
        """Seal a checkpoint folder: trainer_state.json, written last, records the epoch and each file's size and
        SHA-256, so that a file cut short (a copy, a full disk) or changed since is found before it is loaded;
        accelerate itself only warns on unreadable random states, and the run would silently diverge."""
        files = {p.name: _file_digest(p) for p in sorted(checkpoint.iterdir())
                 if p.is_file() and p.name != "trainer_state.json"}
        RunFolder(checkpoint).write_json("trainer_state.json", {"epoch": epoch, "files": files,
                                                                "finished": datetime.now().isoformat()})

    def require_checkpoint(self) -> Path:
        """The last finished checkpoint, its files checked against what was saved."""
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            raise ConfigError(f"{self.path} has no finished checkpoint yet")
        damaged = f"checkpoint {checkpoint} is damaged"
        advice = "restore it from a copy, or start a new run"
        state = _json_or_empty(checkpoint / "trainer_state.json")
        if "epoch" not in state:
            raise ConfigError(f"{damaged}: trainer_state.json is unreadable; {advice}")
        for name, expected in state.get("files", {}).items():   # none recorded by checkpoints of older versions
            path = checkpoint / name
            if not path.exists():
                raise ConfigError(f"{damaged}: {name} is missing; {advice}")
            if _file_digest(path) != expected:
                raise ConfigError(f"{damaged}: {name} differs from what was saved (cut short or changed); {advice}")
        return checkpoint

    def trained_model(self) -> nn.Module:
        """The run's model with the weights of the epoch its results report (the validation-selected one, see
        results.json "selection"), or of its last finished checkpoint for a run that has not saved one."""
        model = build_model(self.config(), self.sources())
        selected = self.path / SELECTED_WEIGHTS
        if selected.exists():
            try:
                state = torch.load(selected, map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError, ValueError, OSError):   # cut short, or not a torch file
                raise ConfigError(f"{selected} is damaged (cut short or changed); restore it from a copy, or "
                                  f"start a new run") from None
            model.load_state_dict(state)
            return model
        return load_weights(model, self.require_checkpoint())


def load_weights(model: nn.Module, checkpoint: Path) -> nn.Module:
    """The model weights of an accelerate checkpoint folder (written by `Accelerator.save_state`)."""
    from safetensors.torch import load_file

    weights = checkpoint / "model.safetensors"
    state = load_file(weights) if weights.exists() else torch.load(checkpoint / "pytorch_model.bin",
                                                                    map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


def _file_digest(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _json_or_empty(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def git_state() -> dict[str, Any]:
    """The commit of the affectprep source tree, and whether it had uncommitted changes; unknown outside git."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=source, capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
