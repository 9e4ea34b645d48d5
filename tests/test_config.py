from dataclasses import dataclass
from typing import Literal

import pytest

from affectprep.config import ConfigError, apply_override, build_dataclass, load_project, parse_value, write_project


@dataclass(frozen=True)
class Opts:
    size: int = 224
    scale: float = 1.0
    mode: Literal["a", "b"] = "a"
    name: str | None = None


def test_values_parse_as_toml_literals_else_strings():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("haar") == "haar" and parse_value('"x y"') == "x y"


def test_override_shorthand_targets_stages():
    raw = {}
    apply_override(raw, "faces.size=256")
    apply_override(raw, "datasets.dfew.media=Clip/clip_224x224")
    assert raw == {"stages": {"faces": {"size": 256}}, "datasets": {"dfew": {"media": "Clip/clip_224x224"}}}
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(raw, "faces.size")


def test_dataclass_validation_names_the_bad_option():
    assert build_dataclass(Opts, {"size": 112, "scale": 2}, "stages.x") == Opts(size=112, scale=2.0)
    with pytest.raises(ConfigError, match=r"stages.x: unknown option\(s\) \['sise'\]"):
        build_dataclass(Opts, {"sise": 1}, "stages.x")
    with pytest.raises(ConfigError, match="stages.x.size: expected int"):
        build_dataclass(Opts, {"size": "big"}, "stages.x")
    with pytest.raises(ConfigError, match="not one of"):
        build_dataclass(Opts, {"mode": "c"}, "stages.x")
    assert build_dataclass(Opts, {"name": "n"}, "x").name == "n"


def test_project_file_roundtrip_with_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    path = tmp_path / "affectprep.toml"
    path.write_text('[datasets.d]\nkind = "dfew"\nroot = "data"\nmedia = "Clip/original"\n'
                    '[stages.faces]\nsize = 224\n')
    project = load_project(path, ["faces.size=112"])
    assert project.datasets["d"].root == (tmp_path / "data").resolve()
    assert project.datasets["d"].options == {"media": "Clip/original"}
    assert project.stages["faces"]["size"] == 112
    assert project.cache == (tmp_path / "cache").resolve()
    write_project(project)
    again = load_project(path)
    assert again.datasets["d"].root == project.datasets["d"].root and again.stages["faces"]["size"] == 112
    assert 'root = "data"' in path.read_text()


def test_missing_or_broken_project_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no project file"):
        load_project(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[datasets\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_project(bad)
