"""Model registry, timm-style: builders register under a name, `create_model(name)` builds one.

Every builder accepts `tiny` (small random configs for tests and CPU smoke runs) plus its own keyword arguments;
the trainer passes `num_classes`, and what the model declares it needs when it registers (`needs`, see NEEDS):
`class_names`, `facs` (the FACS asset rows), the cached-feature switches, `layer_decay` for its param_groups.
Every registered model follows one convention, so the trainer, eval and the tests drive any of them:

- `tasks`: what it learns, a tuple of "expression", "au" and "target" (the expressions of a second domain with few
  labels, e.g. infrared faces next to visible ones; its batches carry "domain" = 1).
- `inputs`: a `ModelInputs` saying what the data loader must supply.
- `example_inputs(batch_size, generator=None)`: random keyword arguments for `model(**inputs)`.
- `batch_inputs(batch)`: a collated loader batch (see models/data.py `collate`) -> keyword arguments for forward
  (the model tokenises its own texts here).
- `forward(**inputs)`: a dict holding "logits" (B, num_classes) for expressions and/or "au_logits" (B, num_aus).
- `loss(outputs, batches, class_weights=None)`: `outputs` and `batches` are dicts keyed by task (a model with two
  tasks gets one batch of each per step, e.g. DFEW clips and BP4D frames); returns a dict with the total "loss"
  and its named parts.
- optional `param_groups(lr, weight_decay[, layer_decay])`: the optimiser's parameter groups, built with
  `layers.optim.parameter_groups`, each named ("visual_encoder", "new", ...); lr and weight_decay come as one value
  per group name (the names of the model's recipe, models/recipes.py). Without it every parameter is group "all".
- optional `begin_epoch(epoch, data)`: called by the trainer in every process before each epoch's first step (PCA
  rebuilds its feature banks there); see models/train.py `EpochData`.
- Devices: the trainer, eval and explain move every tensor of a collated batch to the model's device before
  `batch_inputs` (models/runs.py `to_device`); a model never moves batches itself, only tensors it makes.

A model registers with the rows of its paper's ablation tables (`ablations`), each the options that reproduce
that row, so `affectprep recipe show MODEL` can list them and a test can run every one.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from affectprep.hub import offline_if_unreachable

# Frames are normalised with the ImageNet statistics unless a model says otherwise (VideoMAE was pre-trained so).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelInputs:
    """What a model consumes, so the trainer knows which stores to read and how to prepare each sample."""
    frames: int = 16                 # frames per clip; 1 for still images; 0 for a model without vision
    image_size: int = 224            # aligned face crops are resized to this
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    text: str | None = None          # per-sample text: "caption" (a CATE / caption text version) | "transcript"
    landmarks: bool = False          # batches carry the faces stage's landmarks
    real_landmarks: bool = False     # training refuses a faces store whose landmarks are the mean-shape template
    audio: bool = False              # batches carry 16 kHz waveforms


# Modules under affectprep.models that register models when imported; imported on first registry lookup so
# that `create_model` works without the caller importing each model module first.
_BUILTIN_MODULES = ("grace", "ssm", "mgcma", "pca", "grefel")

@dataclass(frozen=True)
class Ablation:
    """One row of an ablation table of the model's paper, as the options that reproduce it.

    `set` maps `--set` keys to values: training options ("epochs"), model options ("model.motion") and, for rows
    that change the text the model reads, pipeline options ("stages.cate.OPTION", a text version of its own)."""
    table: str          # as the paper numbers it: "Table II"
    row: str            # the row's label in that table: "w/o motion weighting"
    set: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "row": self.row, "set": dict(self.set)}


# What a builder may declare it takes from the trainer (register_model's `needs`):
NEEDS = {
    "class_names": "the expression dataset's label names (builder argument class_names)",
    "facs": "the FACS asset rows (builder argument facs)",
    "video_features": "trains from cached VideoMAE (and text) tokens: builder arguments video_features, "
                      "text_features, video_encoder, text_dim",
    "speech_features": "trains from cached speech and transcript tokens: builder arguments features, audio_dim, "
                       "text_dim",
    "layer_decay": "its param_groups takes layer_decay (layer-wise lr decay)",
    "tasks": "learns the tasks the run has data for unless model.tasks says (builder argument tasks; with one task "
             "its cross-task mapping, dpm, is off)",
}

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_ABLATIONS: dict[str, tuple[Ablation, ...]] = {}
_NEEDS: dict[str, frozenset[str]] = {}
_builtins_loaded = False


def register_model(name: str, *, ablations: Sequence[Ablation] = (), needs: Sequence[str] = ()) -> Callable:
    """Decorator registering `builder(tiny=False, **kwargs) -> nn.Module` under `name`, with its paper's
    ablation rows and what it needs from the trainer (keys of NEEDS)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"a model named {name!r} is already registered")
        _BUILDERS[name] = builder
        _ABLATIONS[name] = tuple(ablations)
        _NEEDS[name] = frozenset(needs)
        return builder
    return decorate


def model_needs(name: str) -> frozenset[str]:
    """What model `name` declared it needs from the trainer (see NEEDS)."""
    model_builder(name)
    return _NEEDS[name]


def model_ablations(name: str) -> tuple[Ablation, ...]:
    """The ablation rows registered with model `name`."""
    model_builder(name)
    return _ABLATIONS[name]


def create_model(name: str, *, tiny: bool = False, **kwargs) -> nn.Module:
    """Build the registered model `name`; `tiny=True` gives its small test configuration. Hub ids among its
    backbones load from the cache without waiting on a hub that cannot be reached (affectprep/hub.py)."""
    offline_if_unreachable()
    return model_builder(name)(tiny=tiny, **kwargs)


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered under `name` (its signature lists the model's options)."""
    _load_builtins()
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models()) or 'none'}")
    return _BUILDERS[name]


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _load_builtins()
    return sorted(_BUILDERS)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")
