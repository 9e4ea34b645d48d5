"""Shared by the benchmarks: a throwaway project over generated clips, and a timer."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from affectprep.config import DatasetConfig, ProjectConfig, write_project


def project_for(root: Path, workdir: Path, name: str = "bench") -> ProjectConfig:
    workdir.mkdir(parents=True, exist_ok=True)
    project = ProjectConfig(workdir / "affectprep.toml", workdir / "cache",
                            {name: DatasetConfig(name, "dfew", root)}, {"faces": {"backend": "haar"}})
    write_project(project)
    return project


@contextmanager
def timed(label: str, results: dict):
    start = time.perf_counter()
    yield
    results[label] = time.perf_counter() - start
