"""Each model's paper recipe through `affectprep recipe show MODEL --json` (the CLI as a user runs it), one test per
model against the values its paper states, and how --set-style overrides resolve."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

from affectprep.config import ConfigError
from affectprep.models.pca import PCA
from affectprep.models.registry import list_models, model_ablations
from affectprep.models.runs import TrainConfig

KEYS = {"optimizer", "param_groups", "momentum", "schedule", "epochs", "batch_size", "class_weighting", "augment",
        "ablations", "sources"}


def show(model: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "affectprep", "recipe", "show", model, "--json"], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def recipes() -> dict[str, dict]:
    return {model: show(model) for model in list_models()}


def groups(recipe: dict) -> dict[str, tuple[float, float]]:
    return {g["name"]: (g["lr"], g["weight_decay"]) for g in recipe["param_groups"]}


def test_every_model_has_a_recipe_whose_every_value_has_a_source(recipes):
    for model, recipe in recipes.items():
        assert KEYS <= set(recipe), model
        assert set(recipe["schedule"]) == {"kind", "warmup_epochs", "min_lr", "step_size", "gamma"}
        assert all(recipe["sources"].get(key) for key in KEYS - {"ablations", "sources"}), model
        assert len(recipe["ablations"]) == len(model_ablations(model))


def test_grace_recipe_is_the_training_details_of_the_paper(recipes):
    r = recipes["grace"]
    assert r["optimizer"] == "adamw" and r["betas"] == [0.9, 0.999] and r["eps"] == 1e-8
    assert groups(r) == {"all": (1e-3, 0.05)} and r["layer_decay"] == 0.75
    assert r["schedule"] == {"kind": "cosine", "warmup_epochs": 5.0, "min_lr": 1e-6, "step_size": None,
                             "gamma": None}
    assert r["model_options"] == {"drop_path_rate": 0.1}
    assert (r["batch_size"], r["epochs"], r["seed"], r["class_weighting"]) == ({"expression": 64}, 30, 3407,
                                                                              "inverse_sqrt")
    assert r["clip_grad"] > 0 and "our choice" in r["sources"]["clip_grad"]


def test_ssm_recipe_is_its_implementation_details(recipes):
    r = recipes["ssm"]
    assert r["optimizer"] == "adamw"
    assert groups(r) == {"visual_encoder": (1e-6, 1e-4), "new": (1e-4, 1e-4)}
    assert r["schedule"]["kind"] == "step" and r["schedule"]["step_size"] == 10 and r["schedule"]["gamma"] == 0.1
    assert r["batch_size"] == {"expression": 12, "au": 128} and r["epochs"] == 30
    assert r["class_weighting"] == "none"
    assert r["augment"]["erase"] > 0 and r["augment"]["flip"] > 0 and any(r["augment"]["color_jitter"])


def test_pca_recipe_is_its_implementation_details(recipes):
    r = recipes["pca"]
    assert r["optimizer"] == "sgd" and r["momentum"] == 0.9
    assert set(groups(r).values()) == {(0.003, 5e-4)}
    assert r["batch_size"]["expression"] == 32 and r["epochs"] == 30
    assert "0.5" in r["sources"]["model_options"]   # lambda1 = lambda2 = 0.5, the model's defaults
    assert inspect.signature(PCA.__init__).parameters["lambdas"].default == (0.5, 0.5)


def test_grefel_recipe_is_its_implementation_details(recipes):
    r = recipes["grefel"]
    assert r["optimizer"] == "adam" and groups(r) == {"all": (3e-4, 0.0)}
    assert r["schedule"]["kind"] == "exponential" and r["schedule"]["gamma"] == 0.995 and r["epochs"] == 1000
    assert r["augment"]["flip"] > 0 and r["augment"]["scale"][0] < 1          # crop 224 of 256, flip
    assert r["augment"]["rotation"] > 0 and any(r["augment"]["color_jitter"])  # rotation, colour
    assert "500" in r["sources"]["class_weighting"] and "512" in r["sources"]["class_weighting"]


def test_mgcma_recipe_says_the_summary_gives_no_optimiser(recipes):
    r = recipes["mgcma"]
    assert r["optimizer"] == "adamw"
    for key in ("optimizer", "param_groups", "schedule", "epochs", "batch_size"):
        assert "gives no optimiser" in r["sources"][key] and "our choice" in r["sources"][key]


def test_overrides_resolve_over_the_recipe_and_are_named_in_the_sources():
    ssm = TrainConfig(model_name="ssm", lr=1e-3, batch_size={"au": 64}, step_size=2).resolved()
    assert ssm.group_lr == {"new": pytest.approx(1e-3), "visual_encoder": pytest.approx(1e-5)}   # ratio kept
    assert ssm.batch_for("expression") == 12 and ssm.batch_for("au") == 64 and ssm.step_size == 2
    recipe = ssm.recipe_json()
    assert recipe["sources"]["param_groups"].startswith("overridden")
    assert recipe["sources"]["batch_size"].startswith("overridden")
    assert not recipe["sources"]["epochs"].startswith("overridden")
    assert ssm.resolved() == ssm
    plain = TrainConfig(model_name="grefel").resolved()
    assert not any(s.startswith("overridden") for s in plain.recipe_json()["sources"].values())
    with pytest.raises(ConfigError, match="visual_encoder"):
        TrainConfig(model_name="ssm", group_lr={"backbone": 1e-5}).resolved()
    with pytest.raises(ConfigError, match="selection"):
        TrainConfig(model_name="grace", val_fraction=0.0).resolved()


def test_recipe_show_prints_a_table_and_refuses_an_unknown_model():
    out = subprocess.run([sys.executable, "-m", "affectprep", "recipe", "show", "pca"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "momentum" in out.stdout and "pca.md" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "affectprep", "recipe", "show", "nope"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "grace" in bad.stderr
