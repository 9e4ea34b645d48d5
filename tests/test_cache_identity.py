"""Cache identity: stores are found where a project is moved, one relabelled row redoes only what learnt from it,
and several worker threads write what one thread writes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from affectprep.config import load_project
from affectprep.pipeline.dag import DatasetPlan, describe, ensure_index, run_pipeline

from pipeline_fixtures import make_project

VISION = ("frames", "faces", "captions")


def stores(project):
    ds = project.datasets["demo"]
    plan = DatasetPlan(project, ds, ensure_index(project, ds))
    return {p.name: p.store for p in plan.stages}


def rows_of(store) -> dict[str, dict]:
    """Every stored row by sample id, without the part files' names or times: what a user reads back."""
    return {row["sample_id"]: row for row in store.read().to_pylist()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity")
    project = make_project(tmp / "a", clips=14)
    run_pipeline(project, scheduler="inline", progress=False)
    return project


def test_a_moved_project_finds_every_store(built, tmp_path):
    keys = {name: s.key for name, s in stores(built).items()}
    moved = tmp_path / "elsewhere"
    shutil.copytree(built.path.parent, moved)
    shutil.rmtree(built.path.parent / "DFEW" / "Clip")   # the old media are gone: nothing may read them
    try:
        project = load_project(moved / "affectprep.toml")
        info = describe(project)[0]
        assert info["index"] is not None, "status must find the index of a moved project"
        assert all(s["pending"] == 0 for s in info["stages"]), info["stages"]
        report = run_pipeline(project, scheduler="inline", progress=False)
        assert all(s.ok == 0 and s.failed == 0 for s in report.stages), "a moved project recomputed samples"
        assert {name: s.key for name, s in stores(project).items()} == keys
        # the stored media paths are relative to the root, so they resolve inside the moved dataset
        index = ensure_index(project, project.datasets["demo"])
        paths = index.read(["media_path"], status="ok").column("media_path").to_pylist()
        assert paths and all(not Path(p).is_absolute() for p in paths)
    finally:
        shutil.copytree(moved / "DFEW" / "Clip", built.path.parent / "DFEW" / "Clip")


def _relabel(root: Path, clip: str) -> None:
    """Give `clip` the next label code in each split file that lists it (DFEW lists a clip once per fold)."""
    for path in (root / "EmoLabel_DataSplit").glob("*/set_*.csv"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            name, _, code = line.partition(",")
            if name == clip:
                lines[i] = f"{name},{int(code) % 7 + 1}"
        path.write_text("\n".join(lines) + "\n")


def test_relabelling_one_row_redoes_no_vision_and_only_what_learnt_from_it(built):
    """Each test fold has its own emotions store (and CATE texts): in each, exactly the predictions of the models
    that trained on the relabelled clip are redone, and the clip's own."""
    before_stores = stores(built)
    before = {name: rows_of(s) for name, s in before_stores.items()}
    clip = "00003"
    affected = {}
    for name, store in before_stores.items():
        if name.startswith("emotions"):
            models = json.loads((store.path / "models.json").read_text())
            trained_on_clip = {m for m, info in models.items() if clip in info["trained_on"]}
            affected[name] = {sid for sid, row in before[name].items() if row["model_id"] in trained_on_clip} | {clip}
    assert len(affected) == 5, "one emotions store per test fold of DFEW"
    _relabel(built.datasets["demo"].root, clip)
    report = {s.stage: s for s in run_pipeline(built, scheduler="inline", progress=False).stages}
    for name in VISION:
        assert report[name].ok == report[name].failed == 0, f"{name} recomputed after a relabel"
    after = {name: rows_of(s) for name, s in stores(built).items()}
    for name in VISION:
        assert after[name] == before[name]
    for name, redone in affected.items():
        cate = name.replace("emotions", "cate")
        assert 0 < len(redone) < len(before[name])
        assert report[name].ok + report[name].failed == len(redone), name
        assert report[cate].ok + report[cate].failed == len(redone & set(before[cate])), cate
        assert all(after[name][sid] == before[name][sid] for sid in set(before[name]) - redone)
    info = {s["name"]: s for s in describe(built)[0]["stages"]}
    assert all(info[name]["pending"] == info[name]["stale"] == 0 for name in affected)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_threads_per_worker_write_what_one_thread_writes(tmp_path):
    """A Dask worker runs several threads by default: the stores it writes must equal an inline run's."""
    project = make_project(tmp_path / "cluster", clips=14)
    shutil.copytree(tmp_path / "cluster", tmp_path / "inline")
    inline = load_project(tmp_path / "inline" / "affectprep.toml")
    run_pipeline(inline, "captions", scheduler="inline", progress=False)

    dask = str(Path(sys.executable).parent / "dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "2",
                                       "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
        run_pipeline(project, "captions", scheduler=address, batch_size=1, progress=False)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
    ours, theirs = stores(project), stores(inline)
    for name in VISION:
        assert ours[name].key == theirs[name].key
        assert rows_of(ours[name]) == rows_of(theirs[name]), f"{name}: 2 threads wrote other rows than 1"
