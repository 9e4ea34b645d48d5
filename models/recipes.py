"""Each registered model's training recipe, as its paper gives it: data, with where every value comes from.

`affectprep recipe show MODEL [--json]` prints one; `affectprep train MODEL` trains with it, any value overridden by
the project's [train] table or `--set` (the run's config.json records the recipe as resolved, its `sources` saying
which values were overridden). A value the paper does not give is our choice, and its source says so and why.

Keys (the JSON of `recipe show`):
  optimizer      adamw | adam | sgd;  betas, eps (Adam/AdamW), momentum (SGD)
  param_groups   [{name, lr, weight_decay}]: the model's named parameter groups (its `param_groups`), each with its
                 peak lr; GRACE's layer-wise decay scales lr inside its one group ("all") by depth (`layer_decay`)
  schedule       {kind: cosine | step | exponential, warmup_epochs, min_lr, step_size, gamma}: cosine runs per
                 optimiser step from each group's lr to its lr * min_lr / lr[first group] after a linear warm-up;
                 step multiplies by gamma every step_size epochs; exponential by gamma every epoch
  epochs, batch_size {task: samples per optimiser step}, class_weighting inverse_sqrt | none, clip_grad (max
  gradient norm; 0 = none), seed, augment {scale, flip, erase, color_jitter, rotation}, model_options (builder options the training
  section sets), selection best_val | last with val_fraction and selection_metric (the paper's metric per task;
  models/splits.py, models/train.py), ablations (the registered ablation rows), sources (key -> citation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from affectprep.config import ConfigError

from .registry import list_models, model_ablations

NOT_IN_PAPER = "not in the paper: our choice, because "


@dataclass(frozen=True)
class Recipe:
    """One model's paper recipe. Every key of `values()` has an entry in `sources`."""
    model: str
    paper: str
    optimizer: str
    param_groups: tuple[dict[str, Any], ...]        # ({"name", "lr", "weight_decay"}, ...)
    schedule: dict[str, Any]                        # kind, warmup_epochs, min_lr, step_size, gamma
    epochs: int
    batch_size: dict[str, int]                      # per task: expression, au, target
    class_weighting: str
    augment: dict[str, Any]                         # scale (area range), flip, erase, color_jitter, rotation
    sources: dict[str, str]
    momentum: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    layer_decay: float | None = None
    clip_grad: float = 0.0
    seed: int = 3407
    model_options: dict[str, Any] = field(default_factory=dict)
    selection: str = "best_val"
    val_fraction: float = 0.1
    # The paper's metric per task that the validation-selected epoch maximises (their mean with two tasks):
    # uar, war (accuracy) or mean_f1 (AUs).
    selection_metric: dict[str, str] = field(default_factory=lambda: {"expression": "uar", "au": "mean_f1"})

    def values(self) -> dict[str, Any]:
        """The recipe's values under the keys of `recipe show --json` (without ablations and sources)."""
        return {"optimizer": self.optimizer, "betas": list(self.betas) if self.betas else None, "eps": self.eps,
                "momentum": self.momentum, "param_groups": [dict(g) for g in self.param_groups],
                "layer_decay": self.layer_decay, "schedule": dict(self.schedule), "epochs": self.epochs,
                "batch_size": dict(self.batch_size), "class_weighting": self.class_weighting,
                "clip_grad": self.clip_grad, "seed": self.seed, "augment": dict(self.augment),
                "model_options": dict(self.model_options), "selection": self.selection,
                "val_fraction": self.val_fraction, "selection_metric": dict(self.selection_metric)}

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "paper": self.paper, **self.values(),
                "ablations": [a.to_json() for a in model_ablations(self.model)], "sources": dict(self.sources)}


def _schedule(kind: str, *, warmup_epochs: float = 0.0, min_lr: float = 0.0, step_size: int | None = None,
              gamma: float | None = None) -> dict[str, Any]:
    return {"kind": kind, "warmup_epochs": warmup_epochs, "min_lr": min_lr, "step_size": step_size, "gamma": gamma}


def _group(name: str, lr: float, weight_decay: float) -> dict[str, Any]:
    return {"name": name, "lr": lr, "weight_decay": weight_decay}


_SELECTION = ("not in the paper: our choice, because the papers report test scores without saying how the epoch "
              "was chosen; choosing it on test would overstate them, so the best validation epoch is reported "
              "(validation = the official one, else a seeded, subject-disjoint 10% of the training part)")
_SEED = NOT_IN_PAPER + "a fixed seed makes runs repeatable; 3407 is GRACE's"

GRACE_T = "grace.md §IV-A3 Implementation Details, Training details"
GRACE = Recipe(
    model="grace", paper="GRACE (grace.md)", optimizer="adamw", betas=(0.9, 0.999), eps=1e-8,
    param_groups=(_group("all", 1e-3, 0.05),), layer_decay=0.75,
    schedule=_schedule("cosine", warmup_epochs=5.0, min_lr=1e-6), epochs=30, batch_size={"expression": 64},
    class_weighting="inverse_sqrt", clip_grad=1.0, seed=3407,
    augment={"scale": (0.8, 1.0), "flip": 0.5, "erase": 0.25}, model_options={"drop_path_rate": 0.1},
    sources={
        "optimizer": f"{GRACE_T}: AdamW",
        "betas": f"{GRACE_T}: 'momentum of 0.9' is beta1; beta2 0.999 is not in the paper: our choice, AdamW's "
                 "default and MAE-DFER's (the recipe GRACE follows)",
        "eps": f"{GRACE_T}: epsilon 1e-8",
        "momentum": "SGD only; GRACE's momentum 0.9 is AdamW's beta1 (betas)",
        "param_groups": f"{GRACE_T}: learning rate 1e-3, weight decay 0.05 (1-D parameters and the region tokens "
                        "without decay: not in the paper, MAE-DFER's skip list)",
        "layer_decay": f"{GRACE_T}: layer-wise learning rate decay 0.75",
        "schedule": f"{GRACE_T}: cosine annealing, minimum learning rate 1e-6, warm-up 5 epochs (linear warm-up, "
                    "stepped per optimiser step: not in the paper, MAE-DFER's scheduler)",
        "epochs": f"{GRACE_T}: 30 epochs",
        "batch_size": f"{GRACE_T}: batch size 64",
        "class_weighting": "grace.md §IV-A2 Preprocessing: inverse-root weighting based on sample frequency (w_c of "
                           "Eq. 6)",
        "clip_grad": f"{GRACE_T}: gradient clipping; the max norm 1.0 is not in the paper: our choice, a common "
                     "value for AdamW fine-tuning of ViTs",
        "seed": f"{GRACE_T}: fixed random seed 3407",
        "augment": "grace.md §IV-A2 Preprocessing: scale jittering, horizontal flipping, erasing-based "
                   "regularisation; the ranges (area 0.8-1, flip 0.5, erase 0.25) are not in the paper: our "
                   "choice, VideoMAE/MAE-DFER's fine-tuning defaults",
        "model_options": f"{GRACE_T}: drop path rate 0.1 (dropout and attention dropout 0.0 are the encoders' own)",
        "selection": _SELECTION, "val_fraction": _SELECTION,
        "selection_metric": "grace.md §IV-A4: UAR is the metric it ranks by (WAR reported beside it)"})

SSM_T = "ssm.md §IV-B Implementation Details"
SSM = Recipe(
    model="ssm", paper="SSM (ssm.md)", optimizer="adamw", betas=(0.9, 0.999), eps=1e-8,
    param_groups=(_group("new", 1e-4, 1e-4), _group("visual_encoder", 1e-6, 1e-4)),
    schedule=_schedule("step", step_size=10, gamma=0.1), epochs=30, batch_size={"expression": 12, "au": 128},
    class_weighting="none", clip_grad=0.0, seed=3407,
    augment={"scale": (0.8, 1.0), "flip": 0.5, "erase": 0.25, "color_jitter": (0.4, 0.4, 0.4, 0.0)},
    sources={
        "optimizer": f"{SSM_T}: AdamW",
        "betas": NOT_IN_PAPER + "the paper names AdamW only; torch's defaults",
        "eps": NOT_IN_PAPER + "the paper names AdamW only; torch's default",
        "momentum": "SGD only",
        "param_groups": f"{SSM_T}: visual encoder branch 1e-6, the remaining branches 1e-4; weight decay "
                        "uniformly 1e-4 (1-D parameters too)",
        "layer_decay": "not used by SSM",
        "schedule": f"{SSM_T}: multi-step decay, x0.1 every 10 epochs (stepped per epoch; no warm-up is named)",
        "epochs": f"{SSM_T}: joint training for 30 epochs",
        "batch_size": f"{SSM_T}: 12 for DFER and 128 for AU, one batch of each task per step (the paper trains "
                      "on 8 GPUs without saying whether these are per GPU; here they are per optimiser step)",
        "class_weighting": "ssm.md Eq. 12: plain cross-entropy, no class weights",
        "clip_grad": NOT_IN_PAPER + "the paper names no clipping, so none",
        "seed": _SEED,
        "augment": f"{SSM_T}: random cropping, random erasing, horizontal flipping and colour jittering (the "
                   "ranges are not in the paper: our choice, the GRACE/VideoMAE crop, flip and erase defaults, and "
                   "timm's default colour jitter 0.4 for brightness, contrast and saturation)",
        "model_options": "nothing in the training section sets a model option",
        "selection": _SELECTION, "val_fraction": _SELECTION,
        "selection_metric": "ssm.md §IV: UAR for DFER, mean F1 over the AUs for AU detection; with both tasks "
                            "their mean (not in the paper: our choice, one model serves both tables)"})

PCA_T = "pca.md §III-A Implementation Details"
PCA = Recipe(
    model="pca", paper="PCA (pca.md)", optimizer="sgd", momentum=0.9,
    param_groups=(_group("prompts", 3e-3, 5e-4), _group("alignment", 3e-3, 5e-4), _group("temperature", 3e-3, 5e-4)),
    schedule=_schedule("cosine", min_lr=0.0), epochs=30, batch_size={"expression": 32, "target": 32},
    class_weighting="none", clip_grad=0.0, seed=3407,
    augment={"scale": (0.8, 1.0), "flip": 0.5, "erase": 0.0}, selection_metric={"expression": "war"},
    sources={
        "optimizer": f"{PCA_T}: SGD",
        "betas": "Adam only", "eps": "Adam only",
        "momentum": f"{PCA_T}: momentum 0.9",
        "param_groups": f"{PCA_T}: initial learning rate 0.003, weight decay 0.0005 for every trained part "
                        "(prompts and transfer maps, the IGA MLPs; CLIP's temperature only in zero-shot CLIP)",
        "layer_decay": "not used by PCA",
        "schedule": NOT_IN_PAPER + "the paper gives only an 'initial' learning rate; cosine to 0 without warm-up "
                    "is the schedule of MaPLe/CoOp, whose prompt learning PCA follows",
        "epochs": f"{PCA_T}: 30 training epochs",
        "batch_size": f"{PCA_T}: batch size 32; Algorithm 1 samples a batch from each domain, so 32 visible and "
                      "32 infrared per step (our reading)",
        "class_weighting": "pca.md Eqs. 8, 12: plain cross-entropy, no class weights",
        "clip_grad": NOT_IN_PAPER + "the paper names no clipping, so none",
        "seed": _SEED,
        "augment": NOT_IN_PAPER + "the paper names no augmentation; a light crop (area 0.8-1) and a flip, as "
                   "CoOp/MaPLe train",
        "model_options": f"{PCA_T}: lambda1 = lambda2 = 0.5 (the model's default, Eq. 13), k = 2 prompts",
        "selection": _SELECTION, "val_fraction": _SELECTION,
        "selection_metric": "pca.md §III: accuracy; selected on the visible (source) validation part, because "
                            "the infrared target has only its few labels, which a hold-out would take from "
                            "training (our choice)"})

GREFEL_T = "grefel.md §4.1 Implementation Details"
GREFEL = Recipe(
    model="grefel", paper="GReFEL (grefel.md)", optimizer="adam", betas=(0.9, 0.999), eps=1e-8,
    param_groups=(_group("all", 3e-4, 0.0),),
    schedule=_schedule("exponential", gamma=0.995), epochs=1000, batch_size={"expression": 64},
    class_weighting="none", clip_grad=0.0, seed=3407,
    augment={"scale": (0.7656, 0.7656), "flip": 0.5, "erase": 0.0, "color_jitter": (0.4, 0.4, 0.4, 0.0),
             "rotation": 15.0}, selection_metric={"expression": "war"},
    sources={
        "optimizer": f"{GREFEL_T}: ADAM optimizer",
        "betas": NOT_IN_PAPER + "the paper names Adam only; torch's defaults",
        "eps": NOT_IN_PAPER + "the paper names Adam only; torch's default",
        "momentum": "SGD only",
        "param_groups": f"{GREFEL_T}: initial learning rate 0.0003; no weight decay is named, so none",
        "layer_decay": "not used by GReFEL",
        "schedule": f"{GREFEL_T}: exponential decay with gamma 0.995 (per epoch; no warm-up is named)",
        "epochs": f"{GREFEL_T}: 1000 epochs (an epoch of the paper's data refinement is B x N_cls = 500 images "
                  "per class, class-balanced; until the trainer draws such epochs, an epoch here is one pass "
                  "over the training part: set epochs lower with --set epochs=N)",
        "batch_size": NOT_IN_PAPER + "the paper gives the images per epoch (B x N_cls), not per step; 64",
        "class_weighting": "grefel.md Eq. 20 and §4.1 Data Distribution Adjustments: unweighted NLL, balance "
                           "comes from class-balanced batches (N_pg = 512 per group, B = 500 per class) instead",
        "clip_grad": NOT_IN_PAPER + "the paper names no clipping, so none",
        "seed": _SEED,
        "augment": f"{GREFEL_T}: resized to 256 and randomly cropped to 224 (area 0.7656), flipping, rotation "
                   "and colour augmentation (the strengths are not in the paper: our choice, up to 15 degrees and "
                   "timm's default colour jitter 0.4; the class-balanced epochs of its data refinement are "
                   "refine_per_group = 512 and refine_per_class = 500, which an epoch count of 1000 assumes)",
        "model_options": "nothing in the training section sets a model option (the MLP head's dropout 0.5 is the "
                 "model's default)",
        "selection": _SELECTION, "val_fraction": _SELECTION,
        "selection_metric": "grefel.md §4: accuracy (RAF-DB, AffectNet, ...)"})

MGCMA_NOTE = ("mgcma.md is a summary of the paper and gives no optimiser, learning rate, schedule, batch size or "
              "epochs: ")
MGCMA = Recipe(
    model="mgcma", paper="MGCMA (mgcma.md, a summary)", optimizer="adamw", betas=(0.9, 0.999), eps=1e-8,
    param_groups=(_group("new", 1e-4, 0.01), _group("encoders", 1e-5, 0.01)),
    schedule=_schedule("cosine", warmup_epochs=1.0, min_lr=0.0), epochs=30, batch_size={"expression": 32},
    class_weighting="none", clip_grad=1.0, seed=3407, augment={"scale": (1.0, 1.0), "flip": 0.0, "erase": 0.0},
    sources={
        "optimizer": MGCMA_NOTE + "AdamW is our choice, because it is what Wav2Vec2/BERT fine-tuning uses",
        "betas": MGCMA_NOTE + "torch's defaults",
        "eps": MGCMA_NOTE + "torch's default",
        "momentum": "SGD only",
        "param_groups": MGCMA_NOTE + "1e-4 for the new modules and 1e-5 for the pre-trained Wav2Vec2 and BERT "
                        "(a tenth, so fine-tuning does not wash out their pre-training), weight decay 0.01 "
                        "(BERT's), our choice",
        "layer_decay": "not used by MGCMA",
        "schedule": MGCMA_NOTE + "linear warm-up for 1 epoch then cosine to 0, our choice (the usual schedule for "
                    "fine-tuning these encoders)",
        "epochs": MGCMA_NOTE + "30, our choice, as the other recipes here",
        "batch_size": MGCMA_NOTE + "32 utterances, our choice (fits Wav2Vec2-base on 35 s utterances in bf16)",
        "class_weighting": "mgcma.md Method Summary: a cross-entropy head, no class weights named",
        "clip_grad": MGCMA_NOTE + "max norm 1.0, our choice, as Wav2Vec2 fine-tuning does",
        "seed": _SEED,
        "augment": "speech: no augmentation is named; the frame augmentation does not apply",
        "model_options": "nothing in the summary sets a model option",
        "selection": _SELECTION, "val_fraction": _SELECTION,
        "selection_metric": "mgcma.md Key Results: UA (unweighted accuracy = UAR) on IEMOCAP, WA beside it"})

RECIPES: dict[str, Recipe] = {r.model: r for r in (GRACE, SSM, PCA, GREFEL, MGCMA)}


def recipe_for(model: str) -> Recipe:
    if model not in list_models():
        raise ConfigError(f"unknown model '{model}'; registered models: {', '.join(list_models())}")
    if model not in RECIPES:
        raise ConfigError(f"no recipe for model '{model}'; recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[model]


def with_overrides(recipe: Recipe, values: dict[str, Any], overridden: dict[str, str]) -> dict[str, Any]:
    """The recipe's JSON with `values` (a resolved run's) in place of the paper's, and for each key in
    `overridden` its source replaced by what overrode it."""
    out = recipe.to_json()
    out.update(values)
    out["sources"] = {**out["sources"], **{key: f"overridden ({why}); the paper's: {out['sources'].get(key, '-')}"
                                           for key, why in overridden.items()}}
    return out


def table(recipe_json: dict[str, Any]) -> str:
    """The recipe as a plain-text table: key, value, source."""
    lines = [f"{recipe_json['paper']} recipe (model '{recipe_json['model']}')", ""]
    width = max(len(k) for k in recipe_json["sources"])
    for key, source in recipe_json["sources"].items():
        value = recipe_json.get(key)
        if key == "param_groups":
            value = ", ".join(f"{g['name']}: lr {g['lr']:g} wd {g['weight_decay']:g}" for g in value)
        elif key == "schedule":
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v is not None)
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        lines.append(f"{key:<{width}}  {value}")
        lines.append(f"{'':<{width}}    <- {source}")
    ablations = recipe_json.get("ablations", [])
    lines += ["", f"ablation rows ({len(ablations)}):"]
    lines += [f"  {a['table']}: {a['row']}  {' '.join(f'{k}={v}' for k, v in a['set'].items()) or '(defaults)'}"
              for a in ablations]
    return "\n".join(lines)
