"""The project file (`affectprep.toml`): datasets, the cache root and every stage's options.

The file is plain TOML. `--set key=value` overrides apply on top of it. Stage options are validated against each
stage's config dataclass, so a typo is a one-line error instead of a silently ignored option.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

DEFAULT_CONFIG_FILE = "affectprep.toml"


class ConfigError(Exception):
    """A usage or configuration mistake; the CLI prints it on one line and exits with code 2."""


# A dataset name becomes a folder under the cache root: one path component, no way out of the cache.
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class DatasetConfig:
    name: str
    kind: str
    root: Path
    options: dict[str, Any] = field(default_factory=dict)
    # Stage options for this dataset only, over the project's [stages] (e.g. a CLIP encoder for an image set
    # beside a VideoMAE for a video set): [datasets.NAME.stages.STAGE].
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_dataset_name(self.name)


def check_dataset_name(name: str) -> str:
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"dataset name {name!r} is not allowed: use letters, digits, '.', '_' and '-' (it names "
                          f"a folder under the cache)")
    return name


@dataclass
class ProjectConfig:
    path: Path | None
    cache: Path
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # raw options per stage, validated by the stage
    train: dict[str, Any] = field(default_factory=dict)   # raw [train] options, validated by the trainer


def load_project(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = (),
                 cache: Path | str | None = None) -> ProjectConfig:
    path = Path(path or DEFAULT_CONFIG_FILE)
    if not path.exists():
        raise ConfigError(f"no project file at {path}: create one with `affectprep init KIND --root PATH`")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for item in overrides:
        apply_override(raw, item)
    return project_from_dict(raw, path, cache)


def project_from_dict(raw: dict[str, Any], path: Path | None, cache: Path | str | None = None) -> ProjectConfig:
    base = path.parent if path else Path.cwd()
    unknown = set(raw) - {"project", "datasets", "stages", "train"}
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)} in {path}; expected project, datasets, stages, "
                          f"train")
    project = raw.get("project", {})
    cache_dir = Path(cache) if cache else base / project.get("cache", "cache")
    datasets = {}
    for name, entry in raw.get("datasets", {}).items():
        entry = dict(entry)
        try:
            kind, root = entry.pop("kind"), entry.pop("root")
        except KeyError as e:
            raise ConfigError(f"dataset '{name}' in {path} has no '{e.args[0]}'") from None
        stages = entry.pop("stages", {})
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise ConfigError(f"datasets.{name}.stages in {path} must hold one table per stage")
        root_path = Path(root).expanduser()
        datasets[name] = DatasetConfig(name, kind, (base / root_path).resolve(), entry,
                                       {k: dict(v) for k, v in stages.items()})
    stages = {k: dict(v) for k, v in raw.get("stages", {}).items()}
    return ProjectConfig(path, cache_dir.resolve(), datasets, stages, dict(raw.get("train", {})))


def project_to_dict(project: ProjectConfig) -> dict[str, Any]:
    base = project.path.parent.resolve() if project.path else Path.cwd()
    return {
        "project": {"cache": _relative(project.cache, base)},
        "datasets": {d.name: {"kind": d.kind, "root": _relative(d.root, base), **d.options,
                              **({"stages": d.stages} if d.stages else {})}
                     for d in project.datasets.values()},
        "stages": project.stages,
        **({"train": project.train} if project.train else {}),
    }


def write_project(project: ProjectConfig) -> None:
    assert project.path is not None
    project.path.write_text(tomli_w.dumps(_toml_ready(project_to_dict(project))))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply `a.b.c=value` to the raw TOML dict. `faces.size=256` is short for `stages.faces.size=256`."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if parts[0] not in ("project", "datasets", "stages"):
        parts = ["stages", *parts]
    if len(parts) < 3 and parts[0] != "project":
        raise ConfigError(f"--set {key}: expected STAGE.OPTION or datasets.NAME.OPTION")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a table")
    node[parts[-1]] = parse_value(value.strip())


def parse_value(text: str) -> Any:
    """TOML literal if it parses (numbers, booleans, lists, quoted strings), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_dataclass(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Instantiate config dataclass `cls` from `raw`, rejecting unknown keys and values of the wrong type."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(names)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**values)
    except ValueError as e:   # the dataclass's own checks (a range, a combination of options)
        raise ConfigError(f"{where}: {e}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return str(path)


def _toml_ready(value: Any) -> Any:
    """TOML has no null and no tuples: drop None values, turn tuples and paths into lists and strings."""
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
