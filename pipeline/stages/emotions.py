"""`emotions`: top-k emotion categories with probabilities per clip, for CATE.

Predictions must be out-of-fold, or the text built from them leaks the label into training; and the texts a model
trains on for a test fold must not carry that fold's test labels. The baseline is cross-fitted: samples are split
into groups; each group is predicted by a model trained on the other groups of the training part, the test part by
a model trained on the whole training part. For a dataset with official folds, the stage makes one store per test
fold k (`protocol = "per_fold"`): fold k is the test part, the other folds are the groups, so no prediction in fold
k's store comes from a model that saw a fold-k test label (GRACE's texts for fold k are built from that store). For a
fixed split the test split is the test part and hash groups of the train split are the groups. Every row names its
model, models.json lists the samples each model trained on, and `in_fold` marks a prediction from a model that saw
the sample's label (only possible with a user checkpoint).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..stage import Stage, digest, failed_row
from .text_backends import decode_crops, parse_backend


@dataclass(frozen=True)
class EmotionsConfig:
    model: str = "baseline"       # baseline | hf:<path-or-id> of a video classification checkpoint
    trained_on: str = "unknown"   # for a checkpoint: unknown | none | folds:1,2,3 | split:train (what it saw)
    top_k: int = 3
    crossfit_groups: int = 5      # datasets without official folds: train split cut into this many groups
    # per_fold: a dataset with official folds gets one store per test fold k, whose predictions come from models
    # that never saw fold k's test labels (the texts GRACE trains on for fold k cannot leak them). pooled: one
    # store cross-fitted over all folds, 1/K of the LLM cost; the training texts of fold k then come from models
    # that trained on fold k's test clips, and `affectprep train` refuses them unless told otherwise.
    protocol: Literal["per_fold", "pooled"] = "per_fold"
    epochs: int = 300
    lr: float = 0.05
    weight_decay: float = 1e-3
    seed: int = 3407
    device: str = "cpu"


class EmotionsStage(Stage):
    name = "emotions"
    version = 1
    Config = EmotionsConfig
    reads = {"faces": ("crops", "frames_per_view"), "index": ("label", "fold", "split")}
    media_kinds = frozenset({"video", "frames", "image"})
    needs_label = True
    scope = "dataset"

    def __init__(self, config: EmotionsConfig):
        super().__init__(config)
        self.kind, self.model = parse_backend(config.model, ("baseline", "hf"), "emotions.model")
        if self.kind == "hf":
            checkpoint_saw(config.trained_on)  # validate early
        # A checkpoint is the same model for every fold (what it saw is in models.json, checked by the trainer).
        self.per_test_fold = self.kind == "baseline" and config.protocol == "per_fold"

    def identity(self) -> dict[str, Any]:
        if self.kind == "hf":
            from ..backends.checkpoints import checkpoint_identity
            return {"classifier": checkpoint_identity(self.model)}
        return {"baseline": "softmax-regression-on-motion-v1"}

    def input_digests(self, ready: list[dict[str, Any]]) -> dict[str, str]:
        """A prediction is made from the sample's own crops and by a model trained on other samples' labels: the
        digest of a baseline prediction holds the sample's own digest and that of its model's training set (ids,
        labels and crops of every sample it trains on), so a relabelled sample redoes exactly the predictions of
        the models that trained on it. A checkpoint's predictions depend on the sample alone."""
        if self.kind == "hf":
            return {s["sample_id"]: s["input_digest"] for s in ready}
        groups = {s["sample_id"]: self._group(s) for s in ready}
        training = {}
        for group in set(groups.values()):
            members = sorted((s["sample_id"], s["label"], s["input_digest"]) for s in ready
                             if groups[s["sample_id"]] not in (group, 0))
            training[group] = digest(members)
        return {s["sample_id"]: digest([s["input_digest"], training[groups[s["sample_id"]]]]) for s in ready}

    def process_dataset(self, rows) -> list[dict[str, Any]]:
        names = self.context["label_names"]
        samples = list(rows)
        if self.kind == "hf":
            return self._from_checkpoint(samples, names)
        return self._crossfit(samples, names)

    # ---- the baseline, cross-fitted ------------------------------------------------------------------------------

    def _crossfit(self, samples: list[dict], names: list[str]) -> list[dict[str, Any]]:
        from ..backends.emotion_baseline import SoftmaxRegression, clip_descriptor

        c = self.config
        x = np.stack([clip_descriptor(s["crops"][: s["frames_per_view"]]) for s in samples]) if samples else None
        y = np.array([s["label"] for s in samples])
        groups = np.array([self._group(s) for s in samples])
        models: dict[str, dict[str, Any]] = {}
        out: list[dict[str, Any]] = []
        for group in sorted(set(groups)):
            # Group 0 is an official test split: its model trains on every non-test sample.
            train = (groups != group) & (groups != 0)
            predict = [i for i in np.flatnonzero(groups == group) if samples[i]["pending"]]
            if not predict:
                continue
            fold = self.context.get("test_fold")
            model_id = (f"baseline-fold{fold}-" if fold is not None else "baseline-") + (
                "test" if group == 0 else f"without-group-{group}")
            if train.sum() == 0 or len(set(y[train])) < 2:
                out += [failed_row(samples[i]["sample_id"], "not enough labelled samples outside this sample's "
                                   "fold to train an out-of-fold baseline") for i in predict]
                continue
            model = SoftmaxRegression(len(names), epochs=c.epochs, lr=c.lr, weight_decay=c.weight_decay,
                                      seed=c.seed).fit(x[train], y[train])
            models[model_id] = {"groups_trained_on": sorted(int(g) for g in set(groups[train])),
                                "trained_on": sorted(samples[i]["sample_id"] for i in np.flatnonzero(train))}
            probs = model.predict_proba(x[predict])
            out += [self._row(samples[i]["sample_id"], p, names, model_id, in_fold=False)
                    for i, p in zip(predict, probs)]
        self._write_models(models)
        return out

    def _group(self, sample: dict) -> int:
        """The cross-fitting group: each group is predicted by a model trained on every other group except 0.
        Group 0 is the test part (test fold k for a store made for fold k, else the official test split), predicted
        by a model trained on the whole training part; the training part's groups are its folds (so for fold k a
        training clip's model saw neither its own fold nor fold k), else hash groups of the train split."""
        test_fold = self.context.get("test_fold")
        fold = int(sample["fold"] or 0)
        if (test_fold is not None and fold == test_fold) or (not fold and sample["split"] == "test"):
            return 0
        if fold:
            return fold
        digest = hashlib.sha256(sample["sample_id"].encode()).digest()
        return 1000 + int.from_bytes(digest[:4], "little") % self.config.crossfit_groups

    # ---- a user's checkpoint -------------------------------------------------------------------------------------

    def _from_checkpoint(self, samples: list[dict], names: list[str]) -> list[dict[str, Any]]:
        from ..backends.classifier_hf import HFVideoClassifier

        classifier = HFVideoClassifier(self.model, device=self.config.device)
        order = _label_order(classifier.labels, names)
        seen = checkpoint_saw(self.config.trained_on)
        model_id = f"checkpoint:{self.model}"
        out = []
        pending = [s for s in samples if s["pending"]]
        for start in range(0, len(pending), 16):
            batch = pending[start:start + 16]
            probs = classifier.predict_proba([decode_crops(s["crops"][: s["frames_per_view"]]) for s in batch])
            for s, p in zip(batch, probs[:, order]):
                out.append(self._row(s["sample_id"], p / p.sum(), names, model_id, in_fold=seen(s)))
        self._write_models({model_id: {"trained_on": self.config.trained_on}})
        return out

    # ---- shared --------------------------------------------------------------------------------------------------

    def _row(self, sample_id: str, probs: np.ndarray, names: list[str], model_id: str, in_fold: bool) -> dict:
        top = np.argsort(-probs)[: self.config.top_k]
        return {"sample_id": sample_id, "status": "ok", "error": None, "top_labels": [int(i) for i in top],
                "top_names": [names[i] for i in top], "top_probs": [float(probs[i]) for i in top],
                "model_id": model_id, "in_fold": bool(in_fold)}

    def _write_models(self, models: dict[str, Any]) -> None:
        folder = self.context.get("store_path")
        if folder and models:
            path = Path(folder) / "models.json"
            known = json.loads(path.read_text()) if path.exists() else {}
            tmp = path.with_name(".models.json.tmp")   # replaced whole, never left half-written
            tmp.write_text(json.dumps({**known, **models}, indent=1, sort_keys=True))
            tmp.replace(path)


def _label_order(model_labels: list[str], names: list[str]) -> list[int]:
    """Column of the checkpoint's output for each of the dataset's classes, matched by name."""
    missing = [n for n in names if n not in model_labels]
    if missing:
        raise ValueError(f"the checkpoint's labels {model_labels} lack {missing} of this dataset's label set")
    return [model_labels.index(n) for n in names]


def checkpoint_saw(spec: str):
    """What a checkpoint saw, as a predicate on index rows: True = the sample's label was in its training data."""
    if spec == "unknown":
        return lambda s: True        # assume the worst: it may have seen everything
    if spec == "none":
        return lambda s: False
    kind, _, value = spec.partition(":")
    if kind == "folds" and value:
        folds = {int(f) for f in value.split(",")}
        return lambda s: s["fold"] in folds
    if kind == "split" and value:
        return lambda s: s["split"] == value
    raise ValueError(f"emotions.trained_on: expected unknown, none, folds:1,2,3 or split:train, got '{spec}'")
