"""SSM and MGCMA trained end to end by the real trainer on real stores.

SSM learns expressions from the demo (DFEW layout) and AUs from a small BP4D tree whose frames are the demo's face
rendered with each expression's action units, labelled with exactly those AUs: both tasks of one run, scored per
task, and the run's DPM maps drawn by `explain`. MGCMA learns from the committed IEMOCAP fixture (espeak-ng speech
with transcripts) through the audio stage, leaving one session out, and `explain` draws its words x frames
cross-attention.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pyarrow.parquet as pq
import pytest

from affectprep.config import ConfigError, DatasetConfig, ProjectConfig, write_project
from affectprep.labels import BP4D_AUS
from affectprep.models.evaluate import evaluate_on, evaluate_run
from affectprep.models.explain import explain_sample
from affectprep.models.registry import model_ablations
from affectprep.models.runs import RunFolder, Sources, TrainConfig, samples_for
from affectprep.models.train import train
from affectprep.pipeline.dag import run_pipeline
from affectprep.pipeline.datasets.bp4d import FOLDS
from affectprep.pipeline.demo import DFEW_LABELS, EXPRESSIONS, make_demo_dataset, render_clip, render_frames
from affectprep.train_sources import resolve_sources

STAGES = {"faces": {"backend": "haar"}, "captions": {"captioner": "motion"}, "cate": {"llm": "template"}}
CLIPS = 35                     # 5 per class; DFEW fold 1 holds 7 of them
# One subject per BP4D fold: fold 1 tests F007 and trains on the other two.
AU_SUBJECTS = ("F001", "M011", "F007")
# BP4D task -> the expression its frames show; together they make every AU with a demo motion occur and not occur.
AU_TASKS = {"T1": "happy", "T2": "sad", "T3": "angry", "T4": "surprise"}
AU_FRAMES = 16                 # images per sequence
# The AU frames coded (1-based, image = frame - 1): the middle of the clip, where the rendered expression is mostly
# visible (render_frames' expression has risen by 0.6 of the clip, and its offset keeps 30 % of the motion).
AU_CODED = range(5, 14, 2)
IEMOCAP = Path(__file__).parent / "fixtures" / "iemocap"


# ---- SSM: demo expressions + rendered BP4D AUs ---------------------------------------------------------------

def au_vector(expression: str) -> list[int]:
    """BP4D's 12 AU occurrences for a demo expression: 1 for each AU its rendering moves."""
    moved = {int(au.removeprefix("AU")) for au in EXPRESSIONS[expression]}
    return [int(au in moved) for au in BP4D_AUS]


def make_rendered_bp4d(root: Path, coded: range = AU_CODED) -> Path:
    """BP4D's layout: Sequences/<subject>/<task>/<image>.jpg and AUCoding/AU_OCC/<subject>_<task>.csv, whose AU
    frame n is image n - 1 as in the release."""
    labels = root / "AUCoding" / "AU_OCC"
    labels.mkdir(parents=True)
    for s, subject in enumerate(AU_SUBJECTS):
        assert subject in FOLDS
        for t, (task, expression) in enumerate(AU_TASKS.items()):
            folder = root / "Sequences" / subject / task
            folder.mkdir(parents=True)
            for image, frame in enumerate(render_frames(expression, seed=100 * s + t, num_frames=AU_FRAMES)):
                assert cv2.imwrite(str(folder / f"{image}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            occurrence = ",".join(map(str, au_vector(expression)))
            rows = [f"{n},{occurrence}" for n in coded]
            (labels / f"{subject}_{task}.csv").write_text(
                "\n".join([",".join(["Frame", *(f"AU{a}" for a in BP4D_AUS)]), *rows]) + "\n")
    return root


@pytest.fixture(scope="module")
def ssm_project(tmp_path_factory) -> ProjectConfig:
    tmp = tmp_path_factory.mktemp("ssm")
    demo = make_demo_dataset(tmp / "DFEW", clips=CLIPS, seed=0)
    bp4d = make_rendered_bp4d(tmp / "BP4D")
    project = ProjectConfig(tmp / "affectprep.toml", tmp / "cache",
                            {"demo": DatasetConfig("demo", "dfew", demo),
                             # A 4-frame window: the tiny SSM reads 4 frames, so detecting 16 would be wasted.
                             "bp4d": DatasetConfig("bp4d", "bp4d", bp4d, {"window": 4})},
                            STAGES)
    write_project(project)
    # In-process: a Dask cluster's start-up costs more than these few clips.
    assert run_pipeline(project, datasets=["demo"], scheduler="inline", progress=False).failed == 0
    # AU frames have no expression label, so the text stages do not apply to them; SSM reads faces and FACS only.
    for stage in ("faces", "facs"):
        assert run_pipeline(project, stage, ["bp4d"], scheduler="inline", progress=False).failed == 0
    return project


def make_rendered_ferv39k(root: Path, per_class: tuple[int, int] = (2, 1)) -> Path:
    """FERV39k's layout (one fixed split): `per_class` (train, test) clips of each demo expression, as frame
    folders of the demo's face rendered with that expression."""
    setups = root / "4_setups" / "All_scenes"
    setups.mkdir(parents=True)
    lines = {"train": [], "test": []}
    for c, label in enumerate(DFEW_LABELS):
        for n in range(sum(per_class)):
            split = "train" if n < per_class[0] else "test"
            clip = f"Scene/{label.capitalize()}/{c * 10 + n:04d}"
            folder = root / "2_ClipsforFaceCrop" / clip
            folder.mkdir(parents=True)
            for i, frame in enumerate(render_frames(label, seed=1000 + 10 * c + n, num_frames=8)):
                assert cv2.imwrite(str(folder / f"{i + 1:04d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            lines[split].append(f"{clip} {label.capitalize()}\n")
    for split, text in lines.items():
        (setups / f"{split}_All.csv").write_text("".join(text))
    return root


@pytest.fixture(scope="module")
def ferv39k_sources(ssm_project) -> Sources:
    """A FERV39k-layout dataset (fixed split) in the SSM project's cache, with faces and FACS."""
    root = make_rendered_ferv39k(ssm_project.cache.parent / "FERV39k")
    project = dataclasses.replace(ssm_project, datasets={"ferv39k": DatasetConfig("ferv39k", "ferv39k", root)})
    for stage in ("faces", "facs"):
        assert run_pipeline(project, stage, ["ferv39k"], scheduler="inline", progress=False).failed == 0
    return resolve_sources(project, "ferv39k")


@pytest.fixture(scope="module")
def ssm_sources(ssm_project):
    return {"expression": resolve_sources(ssm_project, "demo"),
            "au": resolve_sources(ssm_project, "bp4d", expression_set="basic7")}


# These runs report their last epoch and hold nothing out (selection has its own tests).
SSM = dict(model_name="ssm", tiny=True, fold=1, batch_size=8, lr=2e-3, warmup_epochs=1, num_workers=0,
           epochs=12, eval_every=12, selection="last", val_fraction=0.0)


@pytest.fixture(scope="module")
def ssm_run(ssm_sources, tmp_path_factory) -> Path:
    return train(TrainConfig(**SSM), ssm_sources, tmp_path_factory.mktemp("runs"), echo=print)


def test_the_rendered_bp4d_tree_gives_au_samples_in_all_three_folds(ssm_sources):
    rows = ssm_sources["au"].store("index").read().to_pylist()
    assert len(rows) == len(AU_SUBJECTS) * len(AU_TASKS) * len(AU_CODED)
    assert {r["fold"] for r in rows} == {1, 2, 3}
    for row in rows:
        task = row["sample_id"].split("_")[1]
        assert row["au"] == au_vector(AU_TASKS[task]) and row["label"] in (None, -1)
    faces = ssm_sources["au"].store("faces").statuses()
    assert len(faces) == len(rows) and set(faces.values()) == {"ok"}


def test_ssm_learns_expressions_and_aus_in_one_run(ssm_run, ssm_sources):
    run = RunFolder(ssm_run)
    results = run.read_json("results.json")
    expression, au = results["expression"], results["au"]
    assert 0 <= expression["uar"] <= 1 and 0 <= expression["war"] <= 1
    assert set(au["f1"]) == {f"AU{a}" for a in BP4D_AUS}
    # AUs no rendered expression moves (14, 17, 24, and 10 with disgust left out) never occur in the test fold.
    occurring = {f"AU{a}" for a, *on in zip(BP4D_AUS, *map(au_vector, AU_TASKS.values())) if any(on)}
    assert all(au["f1"][name] is not None for name in occurring)
    assert "au_searched_thresholds" in results

    predictions = pq.read_table(ssm_run / "results-predictions.parquet").to_pylist()
    tested = {task: sorted(p["sample_id"] for p in predictions if p["task"] == task) for task in ("expression", "au")}
    for task, task_sources in ssm_sources.items():
        rows = task_sources.store("index").read().to_pylist()
        assert tested[task] == sorted(r["sample_id"] for r in rows if r["fold"] == 1)
    assert results["num_samples"] == len(predictions)
    assert expression["war"] == pytest.approx(
        sum(p["prediction"] == p["label"] for p in predictions if p["task"] == "expression") / len(tested["expression"]))

    metrics = run.read_json("metrics.json")
    assert [m["epoch"] for m in metrics] == list(range(SSM["epochs"]))
    for part in ("loss", "expression/dfe", "au/au"):
        assert all(math.isfinite(m[part]) for m in metrics), part
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[-1]["test"]["expression"]["uar"] == expression["uar"]


def test_explain_draws_the_learnt_dpm_maps_of_the_run(ssm_run, ssm_sources):
    # The maps do not depend on the input: no sample is needed, and one given changes nothing.
    png, record = explain_sample(ssm_run, None, ssm_run / "explain")
    assert (png.name, record.name) == ("dpm-maps.png", "dpm-maps.json") and png.read_bytes()[:4] == b"\x89PNG"
    sample = next(r["sample_id"] for r in ssm_sources["au"].store("index").read().to_pylist() if r["fold"] == 1)
    assert explain_sample(ssm_run, sample, ssm_run / "explain-again")[1].read_text() == record.read_text()
    image = cv2.imread(str(png))
    assert image is not None and min(image.shape[:2]) > 200


def test_ssm_pairs_an_expression_fold_with_an_au_fold_of_its_own(ssm_sources, tmp_path):
    """DFEW fold 5 with BP4D fold 2 (the paper's ablations: DFEW fold 5 with each BP4D fold; Table XI crosses them)."""
    config = TrainConfig(**{**SSM, "fold": 5, "au_fold": 2, "epochs": 1, "eval_every": 1})
    run = RunFolder(train(config, ssm_sources, tmp_path, echo=lambda line: None))
    assert "-fold5-aufold2-" in run.path.name
    assert (run.config().fold, run.config().au_fold) == (5, 2)
    stores = run.read_json("stores.json")
    assert stores["expression"]["test_fold"] == 5 and stores["au"]["test_fold"] == 2
    predictions = pq.read_table(run.path / "results-predictions.parquet").to_pylist()
    for task, fold in (("expression", 5), ("au", 2)):
        rows = ssm_sources[task].store("index").read().to_pylist()
        assert sorted(p["sample_id"] for p in predictions if p["task"] == task) == \
            sorted(r["sample_id"] for r in rows if r["fold"] == fold)


def test_ssm_without_an_au_fold_says_to_pair_one_when_the_folds_differ(ssm_sources, tmp_path):
    config = TrainConfig(**{**SSM, "fold": 5, "epochs": 1})
    with pytest.raises(ConfigError, match=r"no fold 5.*--au-fold"):
        train(config, ssm_sources, tmp_path, echo=lambda line: None)


def test_ssm_trains_ferv39k_s_fixed_split_with_a_bp4d_fold(ssm_sources, ferv39k_sources, tmp_path):
    sources = {"expression": ferv39k_sources, "au": ssm_sources["au"]}
    config = TrainConfig(**{**SSM, "fold": None, "au_fold": 3, "epochs": 1, "eval_every": 1})
    run = RunFolder(train(config, sources, tmp_path, echo=lambda line: None))
    predictions = pq.read_table(run.path / "results-predictions.parquet").to_pylist()
    tested = sorted(p["sample_id"] for p in predictions if p["task"] == "expression")
    assert tested == sorted(r["sample_id"] for r in ferv39k_sources.store("index").read().to_pylist()
                            if r["split"] == "test")
    au_rows = ssm_sources["au"].store("index").read().to_pylist()
    assert sorted(p["sample_id"] for p in predictions if p["task"] == "au") == \
        sorted(r["sample_id"] for r in au_rows if r["fold"] == 3)
    assert run.read_json("stores.json")["au"]["test_fold"] == 3
    # Without an AU fold, the fixed split cannot choose one for BP4D (it has folds only).
    with pytest.raises(ConfigError, match=r"no fixed split: choose a fold.*--au-fold"):
        train(dataclasses.replace(config, au_fold=None), sources, tmp_path, echo=lambda line: None)


def test_ssm_with_an_expression_dataset_alone_trains_expressions_only(ssm_project, tmp_path):
    """The STL rows: `affectprep train ssm --dataset demo --fold 1` without an AU dataset."""
    out = subprocess.run([sys.executable, "-m", "affectprep", "train", "ssm", "--tiny", "--config",
                          str(ssm_project.path), "--dataset", "demo", "--fold", "1", "--runs", str(tmp_path),
                          *(f"--set={k}={v}" for k, v in (("epochs", 1), ("batch_size", 8), ("num_workers", 0)))],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (path,) = tmp_path.glob("ssm-demo-fold1-*")
    run = RunFolder(path)
    assert run.read_json("config.json")["tasks"] == ["expression"]
    model = run.trained_model()
    assert model.tasks == ("expression",) and model.dpm is None and not hasattr(model, "au_temporal")
    results = run.read_json("results.json")
    assert "expression" in results and "au" not in results
    assert set(run.read_json("metrics.json")[0]) >= {"loss", "dfe"}


def test_ssm_with_an_au_dataset_alone_trains_aus_only(ssm_sources, tmp_path):
    config = TrainConfig(**{**SSM, "fold": 2, "epochs": 1, "eval_every": 1})
    run = RunFolder(train(config, {"au": ssm_sources["au"]}, tmp_path, echo=lambda line: None))
    model = run.trained_model()
    assert model.tasks == ("au",) and model.dpm is None and not hasattr(model, "expression_temporal")
    results = run.read_json("results.json")
    assert "au" in results and "expression" not in results
    assert run.read_json("stores.json")["au"]["test_fold"] == 2


def test_au_and_expression_fractions_train_on_a_stratified_part_of_their_task_only(ssm_sources):
    full = TrainConfig(**SSM)
    half = TrainConfig(**{**SSM, "au_fraction": 0.5, "expression_fraction": 0.25})
    for task, fraction in (("au", 0.5), ("expression", 0.25)):
        everything = samples_for(ssm_sources[task], full, "train", task)
        part = samples_for(ssm_sources[task], half, "train", task)
        assert len(part) == round(fraction * len(everything)) and {s["sample_id"] for s in part} < \
            {s["sample_id"] for s in everything}
        # The test part is never thinned.
        assert samples_for(ssm_sources[task], half, "test", task) == samples_for(ssm_sources[task], full, "test", task)
    # Every BP4D task's frames share one AU pattern: half of each task's frames train.
    tasks = Counter(s["sample_id"].split("_")[1] for s in samples_for(ssm_sources["au"], half, "train", "au"))
    assert set(tasks.values()) == {len(AU_CODED)}
    with pytest.raises(ConfigError, match="au_fraction must lie in"):
        TrainConfig(au_fraction=0)


DISFA_SUBJECTS = {"SN001": "happy", "SN003": "surprise", "SN013": "angry"}   # one per DISFA fold


def make_rendered_disfa(root: Path) -> Path:
    """DISFA's layout: a left-camera video per subject (the demo face rendered with one expression) and per-AU
    intensity files coding AU_CODED frames, 3 for each DISFA AU the expression moves and 0 for the others."""
    from affectprep.labels import DISFA_AUS

    for s, (subject, expression) in enumerate(DISFA_SUBJECTS.items()):
        render_clip(expression, root / "Videos_LeftCamera" / f"LeftVideo{subject}_comp.avi", seed=500 + s,
                    num_frames=AU_FRAMES, size=(320, 240))
        folder = root / "ActionUnit_Labels" / subject
        folder.mkdir(parents=True)
        for au in DISFA_AUS:
            value = 3 if f"AU{au}" in EXPRESSIONS[expression] else 0
            (folder / f"{subject}_au{au}.txt").write_text("".join(f"{n},{value}\n" for n in AU_CODED))
    return root


@pytest.fixture(scope="module")
def cross_project(ssm_project, ferv39k_sources) -> ProjectConfig:
    """The SSM project with FERV39k and DISFA beside DFEW and BP4D (Table X's zero-shot pair), in one project file."""
    root = make_rendered_disfa(ssm_project.cache.parent / "DISFA")
    project = dataclasses.replace(ssm_project, path=ssm_project.path.with_name("cross.toml"), datasets={
        **ssm_project.datasets, "ferv39k": DatasetConfig("ferv39k", "ferv39k", ssm_project.cache.parent / "FERV39k"),
        "disfa": DatasetConfig("disfa", "disfa", root, {"window": 4})})
    write_project(project)
    for stage in ("faces", "facs"):
        assert run_pipeline(project, stage, ["disfa"], scheduler="inline", progress=False).failed == 0
    return project


def test_a_run_on_bp4d_and_dfew_is_scored_zero_shot_on_disfa_and_ferv39k(ssm_run, cross_project):
    """SSM Table X through the CLI: DISFA's five AUs shared with BP4D, FERV39k's seven classes."""
    out = subprocess.run([sys.executable, "-m", "affectprep", "eval", str(ssm_run), "--config", str(cross_project.path),
                          "--dataset", "ferv39k", "--dataset", "disfa"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads((ssm_run / "eval-ferv39k-disfa-viewsall.json").read_text())
    assert results["datasets"]["au"]["shared"] == ["AU1", "AU2", "AU4", "AU6", "AU12"]
    assert results["datasets"]["expression"]["shared"] == resolve_sources(cross_project, "ferv39k").label_names
    assert set(results["au"]["f1"]) == {"AU1", "AU2", "AU4", "AU6", "AU12"}
    predictions = pq.read_table(ssm_run / "eval-ferv39k-disfa-viewsall-predictions.parquet").to_pylist()
    disfa = resolve_sources(cross_project, "disfa").store("index").read().to_pylist()
    ferv = resolve_sources(cross_project, "ferv39k").store("index").read().to_pylist()
    # DISFA has folds only: every sample is scored (the model saw none); FERV39k: its test split.
    assert sorted(p["sample_id"] for p in predictions if p["task"] == "au") == sorted(r["sample_id"] for r in disfa)
    assert sorted(p["sample_id"] for p in predictions if p["task"] == "expression") == \
        sorted(r["sample_id"] for r in ferv if r["split"] == "test")
    # The AU labels scored are DISFA's, read at the shared AUs: happy's AU6 and AU12 on SN001's frames.
    happy = next(p for p in predictions if p["task"] == "au" and p["sample_id"].startswith("SN001"))
    assert happy["au"] == [0, 0, 0, 1, 1] and len(happy["au_scores"]) == 5
    assert all(abs(sum(p["probabilities"]) - 1) < 1e-5 for p in predictions if p["task"] == "expression")
    assert "AU F1" in out.stdout and "written:" in out.stdout
    # One fold of DISFA: its test subject only.
    fold = evaluate_on(ssm_run, {"au": resolve_sources(cross_project, "disfa")}, fold=1)
    assert fold["datasets"]["au"]["fold"] == 1 and fold["au"]["f1"].keys() == results["au"]["f1"].keys()


def test_cross_dataset_evaluation_says_in_one_line_when_nothing_is_shared(ssm_run, cross_project, ferv39k_sources):
    strangers = dataclasses.replace(ferv39k_sources, label_names=["calm", "bored"])
    with pytest.raises(ConfigError, match=r"shares no classes with the run's 'demo' \(calm, bored against happy"):
        evaluate_on(ssm_run, {"expression": strangers})
    out = subprocess.run([sys.executable, "-m", "affectprep", "eval", str(ssm_run), "--config", str(cross_project.path),
                          "--dataset", "disfa", "--dataset", "bp4d"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "both au datasets" in out.stderr


# Each distinct option set of SSM's registered ablation rows (many rows share one: the full model recurs in
# every table), as (rows, options).
ABLATION_SETS: dict[str, tuple[list[str], dict]] = {}
for _ablation in model_ablations("ssm"):
    _key = json.dumps(_ablation.set, sort_keys=True)
    ABLATION_SETS.setdefault(_key, ([], _ablation.set))[0].append(f"{_ablation.table}: {_ablation.row}")
TRAIN_OPTIONS = {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("key", list(ABLATION_SETS), ids=[rows[0] for rows, _ in ABLATION_SETS.values()])
def test_every_ssm_ablation_row_trains_one_tiny_epoch(key, ssm_sources, ferv39k_sources, tmp_path):
    rows, options = ABLATION_SETS[key]
    model = {name[len("model."):]: value for name, value in options.items() if name.startswith("model.")}
    train_options = {name: value for name, value in options.items() if not name.startswith("model.")}
    assert set(train_options) <= TRAIN_OPTIONS, rows
    tasks = model.get("tasks", ["expression", "au"])
    # Table XI's FERV39K rows (fold None): its fixed split, beside a BP4D fold.
    available = {**ssm_sources, **({"expression": ferv39k_sources} if "fold" in train_options
                                   and train_options["fold"] is None else {})}
    sources = {task: available[task] for task in tasks}
    config = TrainConfig(**{**SSM, "epochs": 1, "eval_every": 1, **train_options, "model": model})
    run = RunFolder(train(config, sources, tmp_path, echo=lambda line: None))
    assert run.config().model == model
    results = run.read_json("results.json")
    assert set(tasks) <= set(results) and math.isfinite(run.read_json("metrics.json")[0]["loss"])


# ---- MGCMA: IEMOCAP speech + transcripts ---------------------------------------------------------------------

MGCMA = dict(model_name="mgcma", tiny=True, fold=1, batch_size=4, lr=1e-3, warmup_epochs=1, num_workers=0,
             epochs=6, eval_every=6, selection="last", val_fraction=0.0)


@pytest.fixture(scope="module")
def mgcma_sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mgcma")
    root = tmp / "IEMOCAP_full_release"
    shutil.copytree(IEMOCAP, root)
    project = ProjectConfig(tmp / "affectprep.toml", tmp / "cache",
                            {"iemocap": DatasetConfig("iemocap", "iemocap", root)}, STAGES)
    assert run_pipeline(project, "audio", scheduler="inline", progress=False).failed == 0
    return {"expression": resolve_sources(project, "iemocap")}


@pytest.fixture(scope="module")
def mgcma_run(mgcma_sources, tmp_path_factory) -> Path:
    return train(TrainConfig(**MGCMA), mgcma_sources, tmp_path_factory.mktemp("runs"), echo=print)


def test_mgcma_trains_on_one_session_and_predicts_each_utterance_of_the_other_once(mgcma_run, mgcma_sources):
    rows = mgcma_sources["expression"].store("index").read().to_pylist()
    # Session 1 is fold 1's test set (neutral and excited-as-happy), session 2 (angry, sad) trains.
    test_ids = sorted(r["sample_id"] for r in rows if r["fold"] == 1)
    assert test_ids == ["Ses01F_impro01_F000", "Ses01F_impro01_M001"]
    run = RunFolder(mgcma_run)
    assert run.config() == TrainConfig(**MGCMA).resolved()
    assert set(run.read_json("stores.json")["expression"]["stores"]) >= {"index", "audio"}
    assert [p.name for p in run.checkpoints.iterdir()] == [f"epoch-{MGCMA['epochs']:03d}"]
    predictions = pq.read_table(mgcma_run / "results-predictions.parquet").to_pylist()
    assert sorted(p["sample_id"] for p in predictions) == test_ids
    assert all(len(p["probabilities"]) == 4 and abs(sum(p["probabilities"]) - 1) < 1e-4 for p in predictions)
    results = run.read_json("results.json")
    assert results["num_samples"] == 2 and 0 <= results["expression"]["uar"] <= 1


def test_mgcma_training_loss_falls_over_epochs(mgcma_run):
    metrics = RunFolder(mgcma_run).read_json("metrics.json")
    assert [m["epoch"] for m in metrics] == list(range(MGCMA["epochs"]))
    for part in ("loss", "ce", "distribution", "instance"):
        assert all(math.isfinite(m[part]) for m in metrics), part
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[-1]["ce"] < metrics[0]["ce"]


def test_mgcma_checkpoint_loads_back_and_scores_like_the_last_epoch(mgcma_run):
    last = RunFolder(mgcma_run).read_json("results.json")["expression"]
    again = evaluate_run(mgcma_run)
    assert again["num_samples"] == 2 and again["expression"]["confusion"] == last["confusion"]
    before = pq.read_table(mgcma_run / "results-predictions.parquet").sort_by("sample_id").column("probabilities")
    after = pq.read_table(mgcma_run / "eval-viewsall-predictions.parquet").sort_by("sample_id").column("probabilities")
    assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(after.to_pylist(), before.to_pylist()))


def test_explain_draws_mgcma_token_attention_between_words_and_speech(mgcma_run, tmp_path):
    (png, record) = explain_sample(mgcma_run, "Ses01F_impro01_F000", tmp_path)
    assert png.name == "Ses01F_impro01_F000-token-attention.png" and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(record.read_text())
    transcript = data["transcript"]
    assert data["words"] and all(word in transcript for word in data["words"])
    assert len(data["text_to_speech"]) == len(data["words"])
    assert all(abs(sum(row) - 1) < 1e-4 for row in data["text_to_speech"])


# ---- SSM's recipe: the multi-step schedule and one batch of each task's size per step ------------------------

def test_ssm_lr_drops_tenfold_at_the_step_for_both_groups(ssm_sources, tmp_path):
    config = TrainConfig(**{**SSM, "epochs": 3, "eval_every": 3, "lr": None, "warmup_epochs": None,
                            "step_size": 2})
    run = RunFolder(train(config, ssm_sources, tmp_path, echo=lambda _: None))
    lrs = [entry["lrs"] for entry in run.read_json("metrics.json")]
    assert [lr["new"] for lr in lrs] == pytest.approx([1e-4, 1e-4, 1e-5])
    assert [lr["visual_encoder"] for lr in lrs] == pytest.approx([1e-6, 1e-6, 1e-7])


@pytest.fixture(scope="module")
def dense_ssm_sources(tmp_path_factory):
    """The demo expressions and a BP4D tree with all 16 frames of each sequence coded: fold 1 trains on 2 subjects
    x 4 tasks x 16 frames = 128 AU frames, one batch of SSM's AU size."""
    tmp = tmp_path_factory.mktemp("dense")
    demo = make_demo_dataset(tmp / "DFEW", clips=CLIPS, seed=0)
    bp4d = make_rendered_bp4d(tmp / "BP4D", coded=range(1, AU_FRAMES + 1))
    project = ProjectConfig(tmp / "affectprep.toml", tmp / "cache",
                            {"demo": DatasetConfig("demo", "dfew", demo),
                             "bp4d": DatasetConfig("bp4d", "bp4d", bp4d, {"window": 1})}, STAGES)
    write_project(project)
    for stage in ("faces", "facs"):
        for dataset in ("demo", "bp4d"):
            assert run_pipeline(project, stage, [dataset], scheduler="inline", progress=False).failed == 0
    return {"expression": resolve_sources(project, "demo"),
            "au": resolve_sources(project, "bp4d", expression_set="basic7")}


def test_ssm_draws_one_batch_of_12_clips_and_one_of_128_au_frames_per_step(dense_ssm_sources, tmp_path,
                                                                          monkeypatch):
    from affectprep.models.ssm import SSM as SSMModel

    sizes: list[tuple[str, int]] = []
    original = SSMModel.loss

    def recording(self, outputs, batches, class_weights=None):
        (task,) = batches
        sizes.append((task, len(batches[task]["sample_ids"])))
        return original(self, outputs, batches, class_weights)

    monkeypatch.setattr(SSMModel, "loss", recording)
    config = TrainConfig(**{**SSM, "epochs": 1, "eval_every": 1, "batch_size": None})
    assert config.resolved().batch_size["expression"] == 12 and config.resolved().batch_size["au"] == 128
    train(config, dense_ssm_sources, tmp_path, echo=lambda _: None)
    # 28 training clips in batches of 12: 3 steps (12, 12, 4), each with one AU batch of 128.
    assert sizes == [("expression", 12), ("au", 128), ("expression", 12), ("au", 128), ("expression", 4),
                     ("au", 128)]
