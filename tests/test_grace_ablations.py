"""Every registered GRACE ablation row trains for one tiny epoch on a real demo store: its `model.*` options
reach the builder, its training options the trainer, and its `stages.cate.*` options make a text version of
their own that the run then reads."""
from __future__ import annotations

import json

import pytest

from affectprep.config import DatasetConfig, ProjectConfig, write_project
from affectprep.models.registry import model_ablations
from affectprep.models.runs import RunFolder, TrainConfig
from affectprep.models.train import train
from affectprep.pipeline.dag import run_pipeline
from affectprep.pipeline.demo import make_demo_dataset
from affectprep.train_sources import resolve_sources

# Rows that share their options (the full model recurs in every table) run once.
SETS = {json.dumps(a.set, sort_keys=True): a for a in model_ablations("grace")}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> ProjectConfig:
    tmp = tmp_path_factory.mktemp("grace-ablations")
    root = make_demo_dataset(tmp / "DFEW", clips=14, seed=2)
    project = ProjectConfig(tmp / "affectprep.toml", tmp / "cache", {"demo": DatasetConfig("demo", "dfew", root)},
                            {"faces": {"backend": "haar"}, "captions": {"captioner": "motion"},
                             "cate": {"llm": "template"}})
    write_project(project)
    assert run_pipeline(project, scheduler="inline", progress=False).failed == 0
    return project


def with_ablation(project: ProjectConfig, options: dict) -> tuple[ProjectConfig, dict]:
    """The project with the row's stages.* options, and the row's training and model.* options."""
    stages = {name: dict(values) for name, values in project.stages.items()}
    train_options: dict = {"model": {}}
    for key, value in options.items():
        if key.startswith("stages."):
            _, stage, option = key.split(".", 2)
            stages.setdefault(stage, {})[option] = value
        elif key.startswith("model."):
            train_options["model"][key[len("model."):]] = value
        else:
            train_options[key] = value
    return ProjectConfig(project.path, project.cache, project.datasets, stages, project.train), train_options


@pytest.mark.parametrize("ablation", list(SETS.values()), ids=[f"{a.table}: {a.row}" for a in SETS.values()])
def test_each_ablation_row_trains_one_tiny_epoch(project, ablation, tmp_path):
    ablated, options = with_ablation(project, ablation.set)
    if ablated.stages != project.stages:
        assert run_pipeline(ablated, "cate", scheduler="inline", progress=False).failed == 0
    sources = {"expression": resolve_sources(ablated, "demo")}
    if any(key.startswith("stages.cate.") for key in ablation.set):
        texts = lambda project: resolve_sources(project, "demo").for_fold(1).store("texts").key  # noqa: E731
        assert texts(ablated) != texts(project)   # the row's own text version (fold 1's)
    config = TrainConfig(model_name="grace", tiny=True, fold=1, epochs=1, batch_size=4, warmup_epochs=0,
                         num_workers=0, **options)
    run = RunFolder(train(config, sources, tmp_path, echo=lambda _: None))
    assert options["model"].items() <= run.config().model.items()
    (metrics,) = run.read_json("metrics.json")
    assert metrics["loss"] == metrics["loss"] and "test" in metrics          # finite, and evaluated
    assert run.read_json("results.json")["num_samples"] > 0
