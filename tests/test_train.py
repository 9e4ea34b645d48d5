"""The trainer end to end on a real demo project: the pipeline writes the stores, `train` reads them with accelerate
(in this process, and as two processes under `accelerate launch`), `eval` and `explain` read the run folder, and the
`features` stages cache frozen backbones for `--from features`."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, VideoMAEConfig, VideoMAEModel

from affectprep.config import DatasetConfig, ProjectConfig, load_project, write_project
from affectprep.models.evaluate import evaluate_run
from affectprep.models.explain import explain_sample
from affectprep.models.grace import TINY_LGI, TINY_TEXT, TINY_VIDEO
from affectprep.models.runs import RunFolder, TrainConfig
from affectprep.models.text import tiny_tokenizer
from affectprep.models.train import train
from affectprep.pipeline.dag import run_pipeline
from affectprep.pipeline.demo import make_demo_dataset
from affectprep.train_sources import resolve_sources

CLIPS = 70           # 10 per class; DFEW fold 1 holds 14 of them
# GRACE's tiny variant on the demo: small batches so an epoch has several steps; a few CPU seconds per epoch.
# The last epoch is reported and nothing is held out (selection has its own test), so all 56 training clips train.
TINY = dict(model_name="grace", tiny=True, fold=1, batch_size=8, lr=2e-3, warmup_epochs=2, num_workers=0,
            eval_every=10, selection="last", val_fraction=0.0)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> ProjectConfig:
    tmp = tmp_path_factory.mktemp("train")
    root = make_demo_dataset(tmp / "DFEW", clips=CLIPS, seed=0)
    project = ProjectConfig(tmp / "affectprep.toml", tmp / "cache", {"demo": DatasetConfig("demo", "dfew", root)},
                            {"faces": {"backend": "haar"}, "captions": {"captioner": "motion"},
                             "cate": {"llm": "template"}})
    write_project(project)
    assert run_pipeline(project, progress=False).failed == 0
    return project


@pytest.fixture(scope="module")
def sources(project):
    return {"expression": resolve_sources(project, "demo")}


@pytest.fixture(scope="module")
def trained(project, sources, tmp_path_factory) -> Path:
    config = TrainConfig(**TINY, epochs=40)
    lines: list[str] = []
    return train(config, sources, tmp_path_factory.mktemp("runs"), echo=lines.append)


def test_tiny_grace_beats_chance_on_the_demo_store(trained, sources):
    run = RunFolder(trained)
    results = run.read_json("results.json")
    expression = results["expression"]
    # 7 classes: chance UAR is 1/7 (0.14); a model that learned nothing sits there.
    assert expression["uar"] > 0.4, expression
    test_ids = {r["sample_id"] for r in sources["expression"].store("index").read().to_pylist() if r["fold"] == 1}
    predictions = pq.read_table(trained / "results-predictions.parquet").to_pylist()
    assert sorted(p["sample_id"] for p in predictions) == sorted(test_ids)
    assert all(abs(sum(p["probabilities"]) - 1) < 1e-4 for p in predictions)
    assert expression["war"] == pytest.approx(sum(p["prediction"] == p["label"] for p in predictions) / len(test_ids))


def test_the_run_folder_records_config_stores_commit_metrics_and_checkpoint(trained, sources):
    run = RunFolder(trained)
    assert run.config() == TrainConfig(**TINY, epochs=40).resolved()
    stores = run.read_json("stores.json")["expression"]["stores"]
    for role in ("index", "faces", "texts", "facs"):
        assert stores[role]["key"] == sources["expression"].for_fold(1).stores[role].key   # fold 1's texts
    git = run.read_json("git.json")
    assert len(git["commit"]) == 40 or git["commit"] == "unknown"
    metrics = run.read_json("metrics.json")
    assert [m["epoch"] for m in metrics] == list(range(40))
    assert all({"loss", "focal", "supcon", "aux", "lr", "samples_per_s"} <= set(m) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert "test" in metrics[9] and "test" not in metrics[8]          # eval_every=10, and always the last epoch
    assert [p.name for p in run.checkpoints.iterdir()] == ["epoch-040"]
    assert (trained / "results-confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "recall" in (trained / "results-confusion.txt").read_text()


def test_eval_scores_the_checkpoint_like_the_last_epoch_and_with_fewer_views(trained):
    last = RunFolder(trained).read_json("results.json")["expression"]
    again = evaluate_run(trained)
    assert again["expression"]["uar"] == pytest.approx(last["uar"])
    assert again["expression"]["confusion"] == last["confusion"]
    assert (trained / "eval-viewsall.json").exists() and (trained / "eval-viewsall-confusion.png").exists()
    one = evaluate_run(trained, views=1)
    assert one["views"] == 1 and one["num_samples"] == again["num_samples"]
    assert pq.read_table(trained / "eval-views1-predictions.parquet").column("views").to_pylist() == \
        [1] * one["num_samples"]


def test_explain_draws_the_transport_plan_over_phrases_and_frames(trained, sources):
    sample = next(r["sample_id"] for r in sources["expression"].store("index").read().to_pylist() if r["fold"] == 1)
    png, data = explain_sample(trained, sample, trained / "explain")
    assert png.read_bytes()[:4] == b"\x89PNG"
    info = json.loads(data.read_text())
    frames = TINY_LGI.num_frames
    assert len(info["mass"]) == len(info["phrases"]) == len(info["colors"]) > 1
    assert all(len(row) == frames for row in info["mass"])
    # Frames are named by their source frame numbers: the 4 the tiny model reads of the stored 16 of view 0.
    faces = sources["expression"].store("faces").read(["frame_indices", "frames_per_view"], ids=[sample])
    stored = faces.column("frame_indices")[0].as_py()[: faces.column("frames_per_view")[0].as_py()]
    assert info["frame_indices"] == [stored[i] for i in (0, 5, 10, 15)]
    # Each real text token holds 1/L of the mass; the phrases hold all but the special tokens' share.
    assert 0.8 < sum(map(sum, info["mass"])) <= 1.0 + 1e-5
    # The key frames are the tubelet (key_frames = 2 in the tiny model) of highest cumulative affinity.
    scores = dict(zip(info["frame_indices"], info["frame_scores"]))
    assert len(info["key_frames"]) == 2
    others = [n for n in info["frame_indices"] if n not in info["key_frames"]]
    assert min(scores[n] for n in info["key_frames"]) >= max(scores[n] for n in others) - 1e-6
    assert set(info["best_frame"]) == set(info["phrases"]) and set(info["best_frame"].values()) <= set(scores)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(sources, tmp_path):
    config = TrainConfig(**{**TINY, "eval_every": 1}, epochs=3)
    whole = train(config, sources, tmp_path / "whole", echo=lambda _: None)
    part = train(config, sources, tmp_path / "part", stop_after_epoch=1, echo=lambda _: None)
    assert RunFolder(part).latest_checkpoint().name == "epoch-001"
    resumed = train(config, sources, resume=part, echo=lambda _: None)
    assert resumed == part
    a = load_file(RunFolder(whole).latest_checkpoint() / "model.safetensors")
    b = load_file(RunFolder(part).latest_checkpoint() / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [m["loss"] for m in RunFolder(run).read_json("metrics.json")]  # noqa: E731
    assert losses(whole) == losses(part) and len(losses(part)) == 3


def test_a_damaged_checkpoint_is_refused_in_one_line_before_anything_loads_it(sources, tmp_path):
    # accelerate only warns on unreadable random states: without the check, the run would silently diverge.
    part = train(TrainConfig(**TINY, epochs=2), sources, tmp_path / "runs", stop_after_epoch=0, echo=lambda _: None)
    whole = train(TrainConfig(**TINY, epochs=1), sources, tmp_path / "whole", echo=lambda _: None)
    checkpoint = RunFolder(part).require_checkpoint()
    for name in ("random_states_0.pkl", "model.safetensors"):
        damaged = tmp_path / name
        shutil.copytree(part, damaged)
        path = damaged / "checkpoints" / checkpoint.name / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])       # a copy cut short
        done = subprocess.run([sys.executable, "-m", "affectprep", "train", "--resume", str(damaged)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"affectprep: error: checkpoint {damaged / 'checkpoints' / checkpoint.name} is damaged: {name} "
            f"differs from what was saved (cut short or changed); restore it from a copy, or start a new run"]
    assert RunFolder(part).require_checkpoint() == checkpoint                 # the intact run still resumes
    selected = whole / "selected-model.pt"                                    # what eval and explain load
    selected.write_bytes(selected.read_bytes()[: selected.stat().st_size // 2])
    done = subprocess.run([sys.executable, "-m", "affectprep", "eval", str(whole)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"affectprep: error: {selected} is damaged (cut short or changed); restore it from a copy, or start a new run"]


@pytest.fixture
def fresh_accelerate_state():
    # accelerate keeps one process-wide state, fixed by the first Accelerator: a run with another precision in the
    # same process needs it cleared (a real run is one process, so the trainer never does this itself).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_and_gradient_accumulation(sources, tmp_path, fresh_accelerate_state):
    config = TrainConfig(**{**TINY, "eval_every": 1, "warmup_epochs": 0.5}, epochs=1, mixed_precision="bf16",
                         grad_accum=2, clip_grad=0.5)
    lines: list[str] = []
    run = train(config, sources, tmp_path, echo=lines.append)
    # 56 training clips in micro-batches of 4: 14 forward steps, 7 optimiser steps.
    assert "14 steps per epoch" in lines[0]
    scheduler = torch.load(RunFolder(run).latest_checkpoint() / "custom_checkpoint_0.pkl", weights_only=False)
    assert scheduler["last_epoch"] == 7
    (metrics,) = RunFolder(run).read_json("metrics.json")
    # 4 warm-up steps, then the cosine: the 7th and last optimiser step uses step 6's lr, 1/4 of the way down
    # from lr to GRACE's floor (min_lr 1e-6 for lr 1e-3, so 2e-6 for TINY's 2e-3).
    floor = 2e-3 * 1e-6 / 1e-3
    assert metrics["lr"] == pytest.approx(floor + (2e-3 - floor) * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["test"]["expression"]["uar"] >= 0


def test_two_processes_under_accelerate_launch_evaluate_every_test_sample_once(project, sources, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate's --cpu launcher starts several processes only through MPI; --multi_gpu starts them with torchrun,
    # and on a machine without GPUs each process trains on the CPU (gloo), as `accelerate launch --cpu` would.
    # Every fold in one launch: the processes must stay one group from run to run.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "affectprep", "train", "grace", "--tiny", "--config", str(project.path), "--fold", "all",
               "--runs", str(tmp_path), "--set", "epochs=1", "--set", "batch_size=8", "--set", "num_workers=1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("2 process(es)") == 5 and done.stdout.count("summary:") == 1
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [RunFolder(run).config().fold for run in runs] == [1, 2, 3, 4, 5]
    index = sources["expression"].store("index").read().to_pylist()
    for fold, run in enumerate(runs, start=1):
        predictions = pq.read_table(run / "results-predictions.parquet").column("sample_id").to_pylist()
        test_ids = [r["sample_id"] for r in index if r["fold"] == fold]
        assert sorted(predictions) == sorted(test_ids)          # none dropped, none twice
        assert RunFolder(run).read_json("results.json")["num_samples"] == len(test_ids)
    (summary,) = tmp_path.glob("grace-demo-folds-*.json")
    assert json.loads(summary.read_text())["folds"] == [1, 2, 3, 4, 5]


def _save_tiny_encoders(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    video = folder / "videomae"
    # The demo stores 16 frames per view; the cached tokens are what this encoder makes of all 16.
    VideoMAEModel(VideoMAEConfig(**{**TINY_VIDEO, "num_frames": 16})).save_pretrained(video)
    text = folder / "bert"
    BertModel(BertConfig(**TINY_TEXT), add_pooling_layer=False).save_pretrained(text)
    tiny_tokenizer().save_pretrained(text)
    return video, text


def test_features_stages_cache_backbones_and_train_heads_only(project, tmp_path):
    video, text = _save_tiny_encoders(tmp_path)
    raw = load_project(project.path)
    raw.stages["features"] = {"video_encoder": str(video)}
    raw.stages["text_features"] = {"text_encoder": str(text)}
    assert run_pipeline(raw, "features", progress=False).failed == 0
    assert run_pipeline(raw, "text_features", progress=False).failed == 0
    sources = {"expression": resolve_sources(raw, "demo", features=True)}
    features = sources["expression"].store("features")
    row = features.read(ids=[features.read(["sample_id"]).column(0)[0].as_py()]).to_pylist()[0]
    views = sources["expression"].store("faces").read(["num_views"], ids=[row["sample_id"]]).column(0)[0].as_py()
    assert row["visual_shape"] == [views, 8, 4, 32]              # views, T' = 16/2, (32/16)^2 patches, width
    assert row["frame_features"] is None                         # no CLIP configured
    # The token grid comes from the encoder that made the cache (its path is recorded in the features store).
    config = TrainConfig(**{**TINY, "eval_every": 1}, source="features", epochs=2)
    run = train(config, sources, tmp_path / "runs", echo=lambda _: None)
    weights = load_file(RunFolder(run).latest_checkpoint() / "model.safetensors")
    assert not any(k.startswith(("video_encoder.", "text_encoder.")) for k in weights)   # heads only
    assert RunFolder(run).read_json("results.json")["num_samples"] == 14


def test_the_readme_features_recipe_works_as_written(project, tmp_path):
    # `run --stage features --set features.video_encoder=X && train ... --from features`, the project file
    # leaving the stage unconfigured: train finds the store that run made (in a copy: a project moves whole).
    copy = _copy_without_features(project, tmp_path / "project")
    video, _ = _save_tiny_encoders(tmp_path)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "affectprep", *args, "--config", str(copy / "affectprep.toml")],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    made = cli("run", "--stage", "features", "--set", f"features.video_encoder={video}", "--scheduler", "inline")
    assert made.returncode == 0, made.stderr
    tiny = ["--tiny", "--fold", "1", "--from", "features", "--set", "epochs=1", "--set", "num_workers=0",
            "--set", "batch_size=8", "--runs", str(tmp_path / "runs")]
    trained = cli("train", "grace", *tiny)
    assert trained.returncode == 0 and "Traceback" not in trained.stderr, trained.stderr
    stores = json.loads(next((tmp_path / "runs").glob("grace-*/stores.json")).read_text())
    assert stores["expression"]["stores"]["features"]["cache"] == str(copy / "cache")
    # The same with the stage option given to train, as a stage option of `run` is.
    again = cli("train", "grace", *tiny, "--set", f"features.video_encoder={video}")
    assert again.returncode == 0, again.stderr


def test_features_stage_is_opt_in_and_says_what_to_set(project, tmp_path):
    from affectprep.config import ConfigError

    with pytest.raises(ConfigError, match="stages.features.video_encoder"):
        run_pipeline(project, "features", progress=False)
    fresh = _copy_without_features(project, tmp_path / "project")   # no features store made by another test
    with pytest.raises(ConfigError, match="run the features stage|video_encoder"):
        resolve_sources(load_project(fresh / "affectprep.toml"), "demo", features=True)


def _copy_without_features(project: ProjectConfig, folder: Path) -> Path:
    """A copy of the project (a project moves whole) without any features store."""
    shutil.copytree(project.path.parent, folder, ignore=shutil.ignore_patterns("features", "text_features"))
    return folder


def test_train_cli_errors_are_one_line(project, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "affectprep", *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
    unknown = cli("train", "nope", "--config", str(project.path), "--runs", str(tmp_path))
    assert unknown.returncode == 2 and "unknown model 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr
    bad = cli("train", "grace", "--tiny", "--config", str(project.path), "--set", "epochs=two")
    assert bad.returncode == 2 and "train.epochs" in bad.stderr
    fold = cli("train", "grace", "--tiny", "--config", str(project.path), "--fold", "9")
    assert fold.returncode == 2 and "no fold 9" in fold.stderr
    missing = cli("eval", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "not a training run folder" in missing.stderr
    zero = cli("train", "grace", "--tiny", "--config", str(project.path), "--set", "eval_every=0")
    assert zero.returncode == 2 and "train.eval_every must be at least 1" in zero.stderr
    resumed = cli("train", "grace", "--resume", str(tmp_path), "--set", "epochs=3")
    assert resumed.returncode == 2 and "drop MODEL, --set" in resumed.stderr
    au = cli("train", "grace", "--tiny", "--config", str(project.path), "--au-dataset", "demo")
    assert au.returncode == 2 and "no AU labels" in au.stderr
    folds = cli("train", "grace", "--tiny", "--config", str(project.path))
    assert folds.returncode == 2 and "official folds [1, 2, 3, 4, 5]: pass --fold K, or --fold all" in folds.stderr
    target = cli("train", "grace", "--tiny", "--config", str(project.path), "--fold", "1", "--target-dataset", "demo")
    assert target.returncode == 2 and "learns expression; datasets were given for expression, target" in target.stderr
    # Recipe values through --set, table entries included, are checked like any other option.
    size = cli("train", "grace", "--tiny", "--config", str(project.path), "--set", "batch_size.expression=zero")
    assert size.returncode == 2 and "train.batch_size" in size.stderr and "Traceback" not in size.stderr
    group = cli("train", "grace", "--tiny", "--config", str(project.path), "--fold", "1", "--set",
                "group_lr.backbone=1e-5")
    assert group.returncode == 2 and "parameter groups all, not backbone" in group.stderr


# ---- selection on validation ---------------------------------------------------------------------------------

def test_the_reported_epoch_is_the_best_on_validation_never_chosen_on_test(sources, tmp_path):
    config = TrainConfig(**{**TINY, "eval_every": 1, "selection": None, "val_fraction": None}, epochs=5)
    run = RunFolder(train(config, sources, tmp_path, echo=lambda _: None))
    splits = run.read_json("splits.json")["expression"]
    parts = {part: set(ids) for part, ids in splits.items()}
    assert parts["train"] and parts["validation"] and parts["test"]
    assert not (parts["train"] & parts["validation"] or parts["train"] & parts["test"]
                or parts["validation"] & parts["test"])
    index = sources["expression"].store("index").read().to_pylist()
    assert parts["test"] == {r["sample_id"] for r in index if r["fold"] == 1}
    assert len(parts["validation"]) == pytest.approx(0.1 * (len(parts["train"]) + len(parts["validation"])), abs=7)
    metrics = run.read_json("metrics.json")
    results = run.read_json("results.json")
    validation = [m["validation_score"] for m in metrics]
    best = validation.index(max(validation))                      # the first epoch with the best UAR
    assert results["selection"] == {"rule": "best_val", "metric": "expression uar", "split": "validation",
                                    "epoch": best, "validation_score": max(validation)}
    assert results["expression"] == metrics[best]["test"]["expression"]
    assert results["last_epoch"]["epoch"] == 4
    assert results["last_epoch"]["expression"] == metrics[4]["test"]["expression"]
    # eval and explain read the selected epoch's weights.
    assert evaluate_run(run.path)["expression"]["confusion"] == results["expression"]["confusion"]


def test_selection_follows_validation_where_test_would_pick_another_epoch():
    from affectprep.models.train import Selection

    selection = Selection("best_val", {"expression": "uar"})
    validation = [0.30, 0.50, 0.45, 0.50]       # best at epoch 1; a later tie does not move it
    test = [0.20, 0.25, 0.60, 0.40]             # test would pick epoch 2
    chosen = [epoch for epoch, score in enumerate(validation) if selection.consider(epoch, score)]
    assert chosen == [0, 1] and selection.epoch == 1 != test.index(max(test))
    last = Selection("last", {"expression": "uar"})
    assert all(last.consider(epoch, None) for epoch in range(3)) and last.epoch == 2
