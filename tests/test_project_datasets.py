"""Datasets of every kind in one project: names that stay inside the cache, stage options per dataset, stages that
leave out what they do not apply to, and a generic CSV dataset through every stage and into training."""
from __future__ import annotations

import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEModel

from affectprep.config import (ConfigError, DatasetConfig, ProjectConfig, load_project, project_from_dict,
                               write_project)
from affectprep.pipeline.dag import DatasetPlan, ensure_index, run_pipeline
from affectprep.pipeline.demo import make_demo_dataset

import image_dataset_fixtures as F

AFFECTPREP = [sys.executable, "-m", "affectprep.cli"]


def cli(*args, cwd=None):
    return subprocess.run([*AFFECTPREP, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def stores(project, name):
    ds = project.datasets[name]
    return {p.stage.name: p.store for p in DatasetPlan(project, ds, ensure_index(project, ds)).stages}


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", ".hidden", "", "x" * 101])
def test_dataset_names_cannot_leave_the_cache(tmp_path, name):
    with pytest.raises(ConfigError, match="is not allowed"):
        project_from_dict({"datasets": {name: {"kind": "dfew", "root": str(tmp_path)}}}, tmp_path / "p.toml")


def test_init_refuses_an_escaping_name_in_one_line(tmp_path):
    root = make_demo_dataset(tmp_path / "DFEW", clips=7)
    out = cli("init", "dfew", "--root", str(root), "--name", "../../escaped", "--config", str(tmp_path / "p.toml"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "not allowed" in out.stderr
    assert not (tmp_path / "p.toml").exists() and not list(tmp_path.parent.glob("escaped*"))


def test_an_image_set_beside_a_video_set_with_its_own_stage_options(tmp_path):
    video_root = make_demo_dataset(tmp_path / "DFEW", clips=7)
    image_root = F.make_rafdb(tmp_path / "RAF")
    torch.manual_seed(0)
    encoder = tmp_path / "videomae"
    VideoMAEModel(VideoMAEConfig(image_size=32, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
                  ).save_pretrained(encoder)
    project = ProjectConfig(tmp_path / "affectprep.toml", tmp_path / "cache", {
        "clips": DatasetConfig("clips", "dfew", video_root),
        "faces": DatasetConfig("faces", "rafdb", image_root, {"images": "original"},
                               stages={"faces": {"size": 112, "no_face": "center_crop"}}),
    }, {"faces": {"backend": "haar"}, "features": {"video_encoder": str(encoder)}})
    report = run_pipeline(project, "features", scheduler="inline", progress=False)
    by = {(s.dataset, s.stage): s for s in report.stages}
    assert by["clips", "features"].ok == 7 and by["clips", "features"].failed_total == 0
    # VideoMAE encodes clips: the images are left out with a note, not failed with wrong advice.
    assert by["faces", "features"].total == 0 and by["faces", "features"].failed_total == 0
    assert "still images are left out" in by["faces", "features"].note
    crops = {name: stores(project, name)["faces"].read(["crops"], status="ok").column("crops")[0].as_py()[0]
             for name in ("clips", "faces")}
    assert cv2.imdecode(np.frombuffer(crops["faces"], np.uint8), 1).shape == (112, 112, 3)
    assert cv2.imdecode(np.frombuffer(crops["clips"], np.uint8), 1).shape == (224, 224, 3)
    # The dataset's own options are in its keys only.
    assert stores(project, "faces")["faces"].key != stores(project, "clips")["faces"].key
    # The project file keeps them.
    write_project(project)
    assert load_project(project.path).datasets["faces"].stages == {"faces": {"size": 112, "no_face": "center_crop"}}


def test_a_csv_dataset_goes_through_every_stage_and_trains(tmp_path):
    demo = make_demo_dataset(tmp_path / "demo", clips=14)
    root = tmp_path / "mine"
    (root / "clips").mkdir(parents=True)
    lines = ["path,label,split"]
    for i, clip in enumerate(sorted((demo / "Clip" / "original").glob("*.mp4"))):
        shutil.copy(clip, root / "clips" / clip.name)
        name = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")[i % 7]
        written = name.title() if i % 2 else name        # "Happy" and "happy" are one class
        lines.append(f"clips/{clip.name},{written},{'test' if i >= 10 else 'train'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    config = tmp_path / "affectprep.toml"
    assert cli("init", "csv", "--root", str(root), "--name", "mine", "--config", str(config)).returncode == 0
    project = load_project(config)
    project.stages["faces"]["backend"] = "haar"             # the offline backends
    project.stages["captions"]["captioner"] = "motion"
    project.stages["cate"]["llm"] = "template"
    write_project(project)
    out = cli("run", "--config", str(config), "--quiet")
    assert out.returncode == 0, out.stdout + out.stderr
    st = stores(project, "mine")
    texts = st["cate"].read(["text"], status="ok").column("text").to_pylist()
    assert len(texts) == 14 and all("an emotion of" in t for t in texts)
    facs_ids = set(st["facs"].statuses())
    assert {"csv", "csv+bp4d12"} <= facs_ids   # its classes are FACS classes: SSM can use them
    index = ensure_index(project, project.datasets["mine"])
    assert sorted(set(index.read(["label_name"]).column(0).to_pylist())) == sorted(
        ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"))
    trained = cli("train", "grace", "--config", str(config), "--tiny", "--runs", str(tmp_path / "runs"),
                  "--set", "epochs=1", "--set", "batch_size=4", "--set", "num_workers=0", cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert list((tmp_path / "runs").glob("grace-mine-*/results.json"))
