"""The still-image models through the real pipeline and trainer: GReFEL on a RAF-DB-layout set of demo faces (with
the faces stage's landmarks), and PCA from that visible set to an "infrared" one (the same kind of faces, one channel,
another tone curve) with two labels per class kept in the target's training split.

The images are frames of the demo clips (pipeline/demo.py): each seed gives its own camera (position, scale, roll,
lighting), so the sets hold distinct images whose only common cue per class is the expression. The infrared set keeps
the face's polarity: Haar cascades find no face in inverted (thermal-like) gray levels, which would leave no aligned
crop to train on, so its contrast change is a gamma curve instead.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import image_dataset_fixtures as F
from affectprep import schema as S
from affectprep.config import ConfigError, DatasetConfig, ProjectConfig
from affectprep.models.data import few_labels
from affectprep.models.explain import explain_sample
from affectprep.models.grefel import ABLATIONS, GReFEL
from affectprep.models.metrics import cluster_scores
from affectprep.models.pca import PCA, SOURCE, TARGET, sample_keys
from affectprep.models.registry import model_ablations
from affectprep.models.runs import (RunFolder, TrainConfig, build_model, make_dataset, make_loader,
                                    samples_for)
from affectprep.models.train import train
from affectprep.pipeline.dag import run_pipeline
from affectprep.store import Store
from affectprep.train_sources import resolve_sources

TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 5
INFRARED_GAMMA = 2.0         # darkens the mid-tones: a tone curve unlike the visible camera's
TARGET_LABELS = 2
CLASSES = 7
# The Haar faces' landmarks are the mean-shape template: GReFEL trains on them only when told (its geometry is
# tested in test_grefel.py).
# Its learning test keeps the generic recipe it was tuned on (AdamW, cosine, GRACE's augmentation); the paper's
# recipe (Adam, x0.995 per epoch) has its own test below.
GREFEL = dict(model_name="grefel", tiny=True, batch_size=8, epochs=40, lr=3e-3, warmup_epochs=1, num_workers=0,
              eval_every=40, model={"allow_template_landmarks": True}, selection="last", val_fraction=0.0,
              optimizer="adamw", weight_decay=0.05, schedule="cosine", scale=(0.8, 1.0), erase=0.25, clip_grad=1.0,
              rotation=0.0, color_jitter=(0.0, 0.0, 0.0, 0.0))   # the recipe it was tuned on, before GReFEL's heavy one
PCA_RUN = dict(model_name="pca", tiny=True, batch_size=8, epochs=12, lr=5e-3, warmup_epochs=1, num_workers=0,
               eval_every=12, target_labels=TARGET_LABELS, selection="last", val_fraction=0.0)


def make_face_set(root: Path, *, infrared: bool) -> Path:
    """make_rafdb's tree (its bad rows included) plus TRAIN/TEST_PER_CLASS original photos per class, each
    rendered with its own seed; in an infrared set every readable image becomes a one-channel JPEG with a gamma
    curve."""
    F.make_rafdb(root)
    lines, number = [], 100
    for code, label in F._DEMO_LABEL.items():     # RAF-DB code -> demo expression
        for part, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
            for _ in range(count):
                number += 1
                name = f"{part}_{number:05d}.jpg"
                F.write_face(root / "Image" / "original" / name, label, number + (50_000 if infrared else 0))
                lines.append(f"{name} {code}")
    with open(root / "EmoLabel" / "list_patition_label.txt", "a") as labels:
        labels.write("\n".join(lines) + "\n")
    if infrared:
        for path in (root / "Image").rglob("*.jpg"):
            gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if gray is not None:                   # make_rafdb's corrupt image stays corrupt
                cv2.imwrite(str(path), (255 * (gray / 255.0) ** INFRARED_GAMMA).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> ProjectConfig:
    tmp = tmp_path_factory.mktemp("images")
    datasets = {name: DatasetConfig(name, "rafdb", make_face_set(tmp / name, infrared=name == "infrared"),
                                    {"images": "original"})
                for name in ("visible", "infrared")}
    project = ProjectConfig(None, tmp / "cache", datasets, {"faces": {"backend": "haar"}})
    report = run_pipeline(project, "faces", scheduler="inline", progress=False)
    assert [s.stage for s in report.stages] == ["frames", "faces"] * 2
    return project


def usable_test_ids(sources) -> list[str]:
    """Labelled test samples whose aligned face exists: what evaluation must predict, once each."""
    faces = sources.store("faces").statuses()
    return sorted(r["sample_id"] for r in sources.store("index").read(status=S.STATUS_OK).to_pylist()
                  if r["split"] == "test" and r["label"] >= 0 and faces.get(r["sample_id"]) == S.STATUS_OK)


def test_both_sets_reach_the_faces_store_with_gray_infrared_crops(project):
    for name in ("visible", "infrared"):
        sources = resolve_sources(project, name)
        index = sources.store("index")
        failed = sorted(index.read(["sample_id"], status="failed").column("sample_id").to_pylist())
        assert failed == ["test_0003", "train_00003", "train_00004"]          # make_rafdb's bad rows
        faces = sources.store("faces").read(["sample_id", "crops", "landmarks"], status=S.STATUS_OK).to_pylist()
        labels = {r["sample_id"]: r["label"] for r in index.read(status=S.STATUS_OK).to_pylist()}
        per_class = np.bincount([labels[r["sample_id"]] for r in faces], minlength=CLASSES)
        # Haar misses a few demo faces; most of each class must come through.
        assert per_class.min() >= TRAIN_PER_CLASS, (name, per_class)
        crop = cv2.imdecode(np.frombuffer(faces[0]["crops"][0], np.uint8), cv2.IMREAD_COLOR).astype(int)
        colour_spread = np.abs(crop - crop[..., :1]).max()
        assert (colour_spread <= 12) == (name == "infrared"), (name, colour_spread)
        assert all(len(r["landmarks"][0]) == 2 * S.NUM_LANDMARKS for r in faces)


# ---- GReFEL ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grefel_run(project, tmp_path_factory):
    """The run folder, and the landmarks of every training batch GReFEL's loss received (its detector's target)."""
    seen: list[torch.Tensor] = []
    original = GReFEL.loss

    def recording(self, outputs, batches, class_weights=None):
        assert batches["expression"]["frames"].shape[1:] == (1, 3, 64, 64)
        seen.append(batches["expression"]["landmarks"].clone())
        return original(self, outputs, batches, class_weights)

    sources = {"expression": resolve_sources(project, "visible")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GReFEL, "loss", recording)
        run = train(TrainConfig(**GREFEL), sources, tmp_path_factory.mktemp("runs"), echo=lambda _: None)
    return run, sources, seen


def test_grefel_learns_the_expressions_and_war_is_the_accuracy(grefel_run):
    run, sources, _ = grefel_run
    expression = RunFolder(run).read_json("results.json")["expression"]
    predictions = pq.read_table(run / "results-predictions.parquet").to_pylist()
    test_ids = usable_test_ids(sources["expression"])
    assert sorted(p["sample_id"] for p in predictions) == test_ids
    assert expression["war"] == pytest.approx(np.mean([p["prediction"] == p["label"] for p in predictions]))
    # Chance is 1/7 (0.14); the tiny model reaches 0.63-0.91 UAR and WAR on the 35 test faces here (seeds 3407, 1,
    # 2, 5, 6, 7, 8), so 0.4 fails only if it learns far less than that.
    assert expression["uar"] > 0.4 and expression["war"] > 0.4, expression
    metrics = RunFolder(run).read_json("metrics.json")
    losses = [m["loss"] for m in metrics]
    assert all(math.isfinite(v) for v in losses) and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2
    assert {"cls", "anchor", "center", "landmarks"} <= set(metrics[0])
    assert metrics[-1]["landmarks"] < metrics[0]["landmarks"]          # the landmark detector learns
    assert RunFolder(run).config().model == {"allow_template_landmarks": True}   # recorded with the run


def test_the_faces_stage_landmarks_reach_grefel(grefel_run):
    _, _, seen = grefel_run
    assert seen and all(points.shape[1:] == (1, S.NUM_LANDMARKS, 2) and len(points) <= 8 for points in seen)
    points = torch.cat(seen)
    assert torch.isfinite(points).all()
    # The Haar mean shape sits inside the aligned crop; random crops and flips move it a little.
    assert ((points > 0) & (points < 1)).float().mean() > 0.99
    # Eyes (points 36-47) above the mouth (48-67) in every sample: the points keep their 68-point meaning.
    assert (points[..., 36:48, 1].mean(-1) < points[..., 48:68, 1].mean(-1)).all()


def test_grefel_refuses_template_landmarks_unless_told(grefel_run, tmp_path):
    _, sources, _ = grefel_run
    refused = {**GREFEL, "model": {}}
    with pytest.raises(ConfigError) as error:
        train(TrainConfig(**refused), sources, tmp_path, echo=lambda _: None)
    message = str(error.value)
    assert "\n" not in message and "template" in message and "model.allow_template_landmarks=true" in message
    assert not list(tmp_path.iterdir())                     # refused before a run folder exists
    # The same faces with landmarks from a detector (landmark_source "fan") are accepted.
    faces = sources["expression"].store("faces")
    detected = Store(tmp_path / "cache", faces.dataset, "faces", "detected")
    rows = faces.read()
    detected.write(rows.set_column(rows.schema.get_field_index("landmark_source"), "landmark_source",
                                   pa.array(["fan"] * rows.num_rows)))
    real = dataclasses.replace(sources["expression"], stores={**sources["expression"].stores, "faces": detected})
    config = TrainConfig(**refused).resolved()
    model = build_model(config, {"expression": real})
    samples = samples_for(real, config, "train", "expression")
    assert len(make_dataset(model, config, real, samples, train=True)) > 0


def test_grefel_trains_on_refined_class_balanced_epochs_with_heavy_augmentation(project, tmp_path):
    """§4: B images per expression per epoch (from N_pg per face group; each photo is its own group here), with
    rotation and colour jitter on top of the crop and flip."""
    labels: list[int] = []
    original = GReFEL.loss

    def recording(self, outputs, batches, class_weights=None):
        labels.extend(batches["expression"]["labels"].tolist())
        return original(self, outputs, batches, class_weights)

    sources = {"expression": resolve_sources(project, "visible")}
    config = TrainConfig(**{**GREFEL, "epochs": 1, "eval_every": 1, "refine_per_group": 512, "refine_per_class": 3,
                            "rotation": 15.0, "color_jitter": (0.4, 0.4, 0.4, 0.1)})
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GReFEL, "loss", recording)
        run = RunFolder(train(config, sources, tmp_path, echo=lines.append))
    assert Counter(labels) == {c: 3 for c in range(CLASSES)}      # TRAIN_PER_CLASS = 10 images per class
    assert any(f"{3 * CLASSES} training samples" in line for line in lines)
    saved = run.config()
    assert (saved.refine_per_class, saved.rotation, saved.color_jitter) == (3, 15.0, (0.4, 0.4, 0.4, 0.1))
    model = run.trained_model()
    augment = make_dataset(model, saved, sources["expression"], samples_for(sources["expression"], saved, "train",
                                                                            "expression"), train=True).augment
    assert (augment.rotation, augment.color_jitter) == (15.0, (0.4, 0.4, 0.4, 0.1))


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda a: f"{a.table}: {a.row}")
def test_every_grefel_ablation_row_trains(ablation, grefel_run, tmp_path):
    _, sources, _ = grefel_run
    options = {key.removeprefix("model."): value for key, value in ablation.set.items()}
    config = TrainConfig(**{**GREFEL, "epochs": 1, "eval_every": 1,
                            "model": {"allow_template_landmarks": True, **options}})
    run = RunFolder(train(config, sources, tmp_path, echo=lambda _: None))
    trained = run.trained_model()
    assert trained.balancing == options.get("balancing", "both")
    assert set(run.read_json("metrics.json")[0]) >= {*trained.losses, "landmarks", "loss"}
    assert "uar" in run.read_json("results.json")["expression"]


def test_explain_draws_a_trained_grefel(grefel_run, tmp_path):
    run, sources, _ = grefel_run
    sample = usable_test_ids(sources["expression"])[0]
    paths = explain_sample(run, sample, tmp_path)
    assert [p.name for p in paths] == [f"{sample}-landmark-attention.png", f"{sample}-landmark-attention.json",
                                       f"{sample}-reliability.png", f"{sample}-reliability.json"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths[::2])
    prediction = next(p for p in pq.read_table(run / "results-predictions.parquet").to_pylist()
                      if p["sample_id"] == sample)
    reliability = json.loads(paths[3].read_text())
    # The figure explains the prediction evaluation made for this sample (one view here).
    np.testing.assert_allclose(reliability["distributions"]["probabilities"], prediction["probabilities"],
                               atol=1e-5)
    attention = json.loads(paths[1].read_text())
    assert attention["faces_stage_landmarks"] is not None and len(attention["scales"]) == 3


def embeddings_of(model, run: Path):
    """GReFEL embeddings, labels and probabilities of the run's test samples, in sample order."""
    folder = RunFolder(run)
    config, sources = folder.config(), folder.sources()["expression"]
    dataset = make_dataset(model, config, sources, samples_for(sources, config, "test", "expression"),
                           train=False, view=None)
    model.eval()
    records = []
    with torch.no_grad():
        for batch in make_loader(dataset, config.batch_for("expression"), 0):
            outputs = model(**model.batch_inputs(batch))
            records += zip(batch["sample_ids"], outputs["embedding"], batch["labels"], outputs["probabilities"])
    records.sort(key=lambda r: r[0])
    ids, embeddings, labels, probabilities = zip(*records)
    return list(ids), torch.stack(embeddings).numpy(), torch.stack(labels).numpy(), torch.stack(probabilities)


def test_cluster_scores_of_the_test_embeddings(grefel_run):
    run, _, _ = grefel_run
    folder = RunFolder(run)
    config, sources = folder.config(), folder.sources()
    trained = folder.trained_model()
    ids, embeddings, labels, probabilities = embeddings_of(trained, run)
    predictions = sorted(pq.read_table(run / "results-predictions.parquet").to_pylist(), key=lambda p: p["sample_id"])
    # The same model and samples evaluation scored: these are the embeddings behind results.json.
    assert ids == [p["sample_id"] for p in predictions]
    torch.testing.assert_close(probabilities, torch.tensor([p["probabilities"] for p in predictions]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(embeddings), torch.tensor([p["embedding"] for p in predictions]),
                               atol=1e-5, rtol=0)
    scores = cluster_scores(embeddings, labels)
    recorded = folder.read_json("results.json")["expression"]["clusters"]
    assert recorded == pytest.approx(scores, rel=1e-4)
    torch.manual_seed(config.seed)
    untrained = cluster_scores(*embeddings_of(build_model(config, sources), run)[1:3])
    assert all(math.isfinite(v) and v > 0 for v in scores.values()), scores
    # Training pulls each class towards its anchors: tighter, better separated clusters than at initialisation
    # (seven seeds: Calinski-Harabasz 15-37 against 1.9-4.6, Davies-Bouldin 0.7-1.8 against 2.4-3.3 here).
    assert scores["calinski_harabasz"] > 3 * untrained["calinski_harabasz"], (scores, untrained)
    assert scores["davies_bouldin"] < 0.8 * untrained["davies_bouldin"], (scores, untrained)


# ---- PCA -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pca_run(project, tmp_path_factory):
    """The run folder, and per training step the target batch's sample ids, labels and domains."""
    target_batches: list[tuple[list[str], list[int], list[int]]] = []
    original = PCA.loss

    def recording(self, outputs, batches, class_weights=None):
        if "target" in batches:
            batch = batches["target"]
            target_batches.append((batch["sample_ids"], batch["labels"].tolist(), batch["domain"].tolist()))
        return original(self, outputs, batches, class_weights)

    sources = {"expression": resolve_sources(project, "visible"), "target": resolve_sources(project, "infrared")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PCA, "loss", recording)
        run = train(TrainConfig(**PCA_RUN), sources, tmp_path_factory.mktemp("runs"), echo=lambda _: None)
    return run, sources, target_batches


def test_pca_scores_both_domains_and_predicts_each_test_sample_once(pca_run):
    run, sources, _ = pca_run
    results = RunFolder(run).read_json("results.json")
    predictions = pq.read_table(run / "results-predictions.parquet").to_pylist()
    for task in ("expression", "target"):
        assert {"uar", "war", "confusion"} <= set(results[task]), task
        mine = [p for p in predictions if p["task"] == task]
        assert sorted(p["sample_id"] for p in mine) == usable_test_ids(sources[task]), task
        assert results[task]["war"] == pytest.approx(np.mean([p["prediction"] == p["label"] for p in mine]))
    assert results["num_samples"] == len(predictions)
    assert (run / "results-target-confusion.png").read_bytes()[:4] == b"\x89PNG"
    losses = [m["loss"] for m in RunFolder(run).read_json("metrics.json")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_pca_trains_on_two_target_labels_per_class(pca_run):
    run, sources, target_batches = pca_run
    assert target_batches and all(set(domains) == {1} for _, _, domains in target_batches)
    labelled: dict[str, int] = {}
    unlabelled: set[str] = set()
    for ids, labels, _ in target_batches:
        for sample_id, label in zip(ids, labels):
            if label >= 0:
                labelled[sample_id] = label
            else:
                unlabelled.add(sample_id)
    config = RunFolder(run).config()
    train_samples = samples_for(sources["target"], config, "train", "target")
    usable = {sid for sid, status in sources["target"].store("faces").statuses().items() if status == S.STATUS_OK}
    kept = {s["sample_id"]: s["label"] for s in few_labels([s for s in train_samples if s["sample_id"] in usable],
                                                            TARGET_LABELS, config.seed) if s["label"] >= 0}
    # Exactly the labels few_labels kept, drawn among the samples with a face: two true labels per class.
    assert labelled == kept
    assert list(np.bincount(list(labelled.values()))) == [TARGET_LABELS] * CLASSES
    # The rest of the target's training split still arrives, unlabelled: PCA uses it neither in its loss nor in
    # its banks (labelled samples only, §II-C).
    true_labels = {s["sample_id"]: s["label"] for s in train_samples}
    assert unlabelled and not unlabelled & set(labelled) and unlabelled <= set(true_labels)
    assert len(unlabelled) > len(labelled)


def test_pca_banks_hold_the_most_confident_labelled_training_samples(pca_run):
    run, sources, _ = pca_run
    folder = RunFolder(run)
    model, config = folder.trained_model(), folder.config()
    usable = {task: {sid for sid, status in s.store("faces").statuses().items() if status == S.STATUS_OK}
              for task, s in sources.items()}
    train_samples = {task: [r for r in samples_for(sources[task], config, "train", task)
                            if r["sample_id"] in usable[task]] for task in sources}
    labelled = {"expression": train_samples["expression"],
                "target": [r for r in few_labels(train_samples["target"], TARGET_LABELS, config.seed)
                           if r["label"] >= 0]}
    for domain, task, per_class in ((SOURCE, "expression", 5), (TARGET, "target", TARGET_LABELS)):
        for c in range(CLASSES):
            filled = torch.isfinite(model.bank_scores[domain, c])
            keys = model.bank_keys[domain, c][filled].tolist()
            allowed = set(sample_keys([r["sample_id"] for r in labelled[task] if r["label"] == c]).tolist())
            assert len(keys) == len(set(keys)) == min(per_class, len(allowed)), (task, c)
            assert set(keys) <= allowed, (task, c)


def test_grefel_lr_decays_by_its_papers_gamma_every_epoch(project, tmp_path):
    paper = {key: None for key in ("lr", "warmup_epochs", "optimizer", "weight_decay", "schedule", "scale", "erase",
                                   "clip_grad")}
    config = TrainConfig(**{**GREFEL, "epochs": 3, "eval_every": 3, **paper})
    run = RunFolder(train(config, {"expression": resolve_sources(project, "visible")}, tmp_path, echo=lambda _: None))
    lrs = [entry["lrs"] for entry in run.read_json("metrics.json")]
    assert [lr["all"] for lr in lrs] == pytest.approx([3e-4, 3e-4 * 0.995, 3e-4 * 0.995 ** 2])
    recipe = run.read_json("config.json")["recipe"]
    assert recipe["optimizer"] == "adam" and recipe["schedule"]["gamma"] == 0.995
    assert recipe["sources"]["epochs"].startswith("overridden")    # 3, not the paper's 1000


def test_explain_draws_pca_bank_attention_for_a_target_test_sample(pca_run, tmp_path):
    run, sources, _ = pca_run
    sample = usable_test_ids(sources["target"])[0]
    png, record = explain_sample(run, sample, tmp_path)
    assert png.name == f"{sample}-bank-attention.png" and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(record.read_text())
    assert data["sample_id"] == sample and len(data["attention"]) == 2
    assert all(len(row) == CLASSES for row in data["attention"])


@pytest.mark.parametrize("ablation", model_ablations("pca"),
                         ids=lambda a: f"{a.table} {a.row}".replace("✓", "on").replace("×", "off"))
def test_each_pca_ablation_row_trains_for_one_epoch(project, ablation, tmp_path):
    options = {key.removeprefix("model."): value for key, value in ablation.set.items() if key.startswith("model.")}
    training = {key: value for key, value in ablation.set.items() if not key.startswith("model.")}
    config = TrainConfig(**{**PCA_RUN, "epochs": 1, "eval_every": 1, "model": options, **training})
    sources = {"expression": resolve_sources(project, "visible"), "target": resolve_sources(project, "infrared")}
    run = train(config, sources, tmp_path, echo=lambda _: None)
    results = RunFolder(run).read_json("results.json")
    assert {"uar", "war"} <= set(results["expression"]) and {"uar", "war"} <= set(results["target"])
    (entry,) = RunFolder(run).read_json("metrics.json")
    assert math.isfinite(entry["loss"]) and ("expression/iga" in entry) == options.get("iga", True)
