"""The top-3 texts never carry test labels into training: per test fold, every prediction behind a text comes from
a model that saw none of that fold's test labels; the trainer picks the fold's own texts and refuses leaky ones."""
from __future__ import annotations

import json

import pytest

from affectprep.config import ConfigError, DatasetConfig, ProjectConfig, load_project, write_project
from affectprep.models.runs import RunFolder, TrainConfig
from affectprep.models.train import train
from affectprep.pipeline.dag import DatasetPlan, ensure_index, run_pipeline
from affectprep.pipeline.demo import make_demo_dataset
from affectprep.train_sources import resolve_sources

TINY = dict(model_name="grace", tiny=True, epochs=1, batch_size=4, lr=2e-3, warmup_epochs=0, num_workers=0)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leak")
    root = make_demo_dataset(tmp / "DFEW", clips=14, seed=2)
    project = ProjectConfig(tmp / "affectprep.toml", tmp / "cache", {"demo": DatasetConfig("demo", "dfew", root)},
                            {"faces": {"backend": "haar"}, "captions": {"captioner": "motion"},
                             "cate": {"llm": "template"}})
    write_project(project)
    assert run_pipeline(project, scheduler="inline", progress=False).failed == 0
    return project


def plans(project):
    ds = project.datasets["demo"]
    return DatasetPlan(project, ds, ensure_index(project, ds))


def test_no_prediction_behind_a_fold_k_text_saw_a_fold_k_test_label(project):
    plan = plans(project)
    index = plan.index.read(["sample_id", "fold"], status="ok").to_pylist()
    folds = sorted({r["fold"] for r in index})
    assert folds == [1, 2, 3, 4, 5]
    for fold in folds:
        test = {r["sample_id"] for r in index if r["fold"] == fold}
        emotions = plan.by_name[f"emotions[fold {fold}]"].store
        models = json.loads((emotions.path / "models.json").read_text())
        rows = emotions.read(["sample_id", "model_id"], status="ok").to_pylist()
        assert {r["sample_id"] for r in rows} == {r["sample_id"] for r in index}   # train and test samples
        for row in rows:
            trained_on = set(models[row["model_id"]]["trained_on"])
            assert not trained_on & test, f"fold {fold}: {row['sample_id']} predicted by a model that saw a test label"
            assert row["sample_id"] not in trained_on                                 # and out of fold
        # the test clips' model trained on the whole training part; each training clip's on the other folds
        test_model = {r["model_id"] for r in rows if r["sample_id"] in test}
        assert len(test_model) == 1 and set(models[test_model.pop()]["trained_on"]) == \
            {r["sample_id"] for r in index} - test
        cate = plan.by_name[f"cate[fold {fold}]"].store
        assert cate.read_config()["inputs"]["emotions"] == emotions.key
        assert len(cate.read(["sample_id"], status="ok")) == len(index)


def test_training_on_fold_k_reads_fold_k_texts(project, tmp_path):
    sources = resolve_sources(project, "demo")
    assert sources.text_leaks == {}
    run = train(TrainConfig(**TINY, fold=3), {"expression": sources}, tmp_path / "runs", echo=lambda _: None)
    recorded = RunFolder(run).read_json("stores.json")["expression"]
    assert recorded["test_fold"] == 3 and recorded["leak_accepted"] is None
    assert recorded["stores"]["texts"]["key"] == plans(project).by_name["cate[fold 3]"].key
    with pytest.raises(ConfigError, match="--fold K"):
        sources.store("texts")   # no fold: which texts is undefined


def test_pooled_predictions_are_refused_unless_accepted_and_then_recorded(project, tmp_path):
    pooled = load_project(project.path, ["emotions.protocol=pooled"])
    run_pipeline(pooled, scheduler="inline", progress=False)
    sources = resolve_sources(pooled, "demo")
    assert set(sources.text_leaks) == {1, 2, 3, 4, 5}
    with pytest.raises(ConfigError, match="carry test labels") as error:
        train(TrainConfig(**TINY, fold=1), {"expression": sources}, tmp_path / "runs", echo=lambda _: None)
    assert "\n" not in str(error.value) and "allow_leaky_text" in str(error.value)
    run = train(TrainConfig(**TINY, fold=1, allow_leaky_text=True), {"expression": sources}, tmp_path / "runs",
                echo=lambda _: None)
    assert "fold 1" in RunFolder(run).read_json("stores.json")["expression"]["leak_accepted"]


def test_another_folds_text_version_is_refused_for_this_fold(project):
    other = plans(project).by_name["cate[fold 2]"].key
    sources = resolve_sources(project, "demo", text_version=other)
    assert 2 not in sources.text_leaks and {1, 3, 4, 5} <= set(sources.text_leaks)
    with pytest.raises(ConfigError, match="carry test labels"):
        sources.for_fold(1).check_texts(allow_leak=False)


def test_a_text_version_with_no_usable_row_is_one_line_naming_it(project, tmp_path):
    import dataclasses

    from affectprep import schema as S
    from affectprep.store import Store

    sources = resolve_sources(project, "demo").for_fold(1)
    texts = sources.stores["texts"]
    ids = texts.read(["sample_id"]).column("sample_id").to_pylist()
    # The same samples, every one failed (an LLM that answered nothing): a real store of the cate schema.
    empty = Store(texts.cache, texts.dataset, texts.stage, "0" * 16)
    empty.write([{"sample_id": sid, "status": S.STATUS_FAILED, "error": "the LLM returned nothing"} for sid in ids])
    broken = dataclasses.replace(sources, stores={**sources.stores, "texts": empty}, fold_stores={}, text_leaks={})
    with pytest.raises(ConfigError) as refused:
        train(TrainConfig(**TINY, fold=1), {"expression": broken}, tmp_path / "runs", echo=lambda _: None)
    message = str(refused.value)
    assert "\n" not in message and empty.key in message and "--text-version" in message
    assert "has no text" in message
