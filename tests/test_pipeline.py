"""End to end: real clips, real Parquet, the real Dask scheduler, the real CLI."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from affectprep import schema as S
from affectprep.config import load_project
from affectprep.pipeline.dag import describe, plan_stages, ensure_index, run_pipeline

from pipeline_fixtures import BAD, OUTSIDE, SHORT, UNKNOWN_LABEL, make_project

AFFECTPREP = [sys.executable, "-m", "affectprep.cli"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("proj"))


@pytest.fixture(scope="module")
def first_run(project):
    return run_pipeline(project, scheduler="inline", progress=False)


def stores(project):
    index = ensure_index(project, project.datasets["demo"])
    return index, {p.stage.name: p.store for p in plan_stages(project, index, None)}


def test_good_samples_become_aligned_16_frame_clips(project, first_run):
    index, st = stores(project)
    faces = st["faces"].read(status=S.STATUS_OK).to_pylist()
    good = [r["sample_id"] for r in index.read(["sample_id"], status="ok").to_pylist()
            if r["sample_id"] not in BAD]
    assert sorted(r["sample_id"] for r in faces) == sorted(good)
    for row in faces:
        assert len(row["crops"]) == len(row["frame_indices"]) == 16 == len(row["landmarks"])
        crop = cv2.imdecode(np.frombuffer(row["crops"][0], np.uint8), cv2.IMREAD_COLOR)
        assert crop.shape == (224, 224, 3)
        assert len(row["landmarks"][0]) == 136 and row["backend"] == "haar"
        assert sum(row["detected"]) >= 12  # the face is visible throughout every demo clip
    frames = {r["sample_id"]: r for r in st["frames"].read(status="ok").to_pylist()}
    short = frames[SHORT]
    assert short["padded"] and short["num_source_frames"] == 8
    assert short["frame_indices"][-9:] == [7] * 9  # padded by repeating the last frame
    normal = frames[good[0]]
    assert not normal["padded"] and normal["frame_indices"] == sorted(normal["frame_indices"])


def test_each_bad_input_is_a_failed_row_with_a_readable_error(project, first_run):
    index, st = stores(project)
    index_errors = {r["sample_id"]: r["error"] for r in index.read(status="failed").to_pylist()}
    frames_errors = {r["sample_id"]: r["error"] for r in st["frames"].read(status="failed").to_pylist()}
    faces_errors = {r["sample_id"]: r["error"] for r in st["faces"].read(status="failed").to_pylist()}
    everything = {**index_errors, **frames_errors, **faces_errors}
    assert "unknown label" in everything[UNKNOWN_LABEL]
    # DFEW names clips by number, so a path is refused before it is ever resolved
    assert [e for e in index_errors.values() if f"'{OUTSIDE}' is not a clip number" in e], index_errors
    assert "no video or frame folder named '90004'" in everything["90004"]
    assert "is empty (0 bytes)" in everything["90003"]
    assert "unreadable video 90001.mp4" in frames_errors["90001"]
    assert "90002.mp4" in frames_errors["90002"]
    assert "no face" in faces_errors["90006"]
    for error in everything.values():
        assert "Traceback" not in error and len(error) < 500
    # the summary counts every failure once
    assert first_run.failed == len(everything)


def test_rerun_does_no_work_and_writes_nothing(project, first_run):
    _, st = stores(project)
    parts = {name: s.parts() for name, s in st.items()}
    again = run_pipeline(project, scheduler="inline", progress=False)
    assert all(s.ok == 0 and s.failed == 0 for s in again.stages)
    assert {name: s.parts() for name, s in st.items()} == parts
    assert again.failed == first_run.failed


def test_status_reports_counts_and_errors(project, first_run):
    info = describe(project)[0]
    by_stage = {s["stage"]: s for s in info["stages"]}
    assert by_stage["faces"]["pending"] == 0 and by_stage["frames"]["pending"] == 0
    assert by_stage["faces"]["failed"] == len(by_stage["faces"]["failures"]) >= 1
    assert by_stage["faces"]["blocked"] == by_stage["frames"]["failed"]
    assert info["index"]["failed"] >= 2 and by_stage["faces"]["bytes"] > 0


def test_changed_option_makes_a_new_store_beside_the_old(project, first_run, tmp_path):
    _, before = stores(project)
    changed = load_project(project.path, ["faces.size=112"])
    report = run_pipeline(changed, "faces", scheduler="inline", progress=False, limit=3)
    index, after = stores(changed)
    assert after["frames"].key == before["frames"].key  # frames is untouched
    assert after["faces"].key != before["faces"].key and before["faces"].exists()
    crops = after["faces"].read(["crops"], status="ok").column("crops").to_pylist()
    assert len(crops) <= 3 and cv2.imdecode(np.frombuffer(crops[0][0], np.uint8), 1).shape == (112, 112, 3)
    assert json.loads((after["faces"].path / "config.json").read_text())["config"]["size"] == 112
    assert report.stages[-1].total == 3


# ---- the CLI -------------------------------------------------------------------------------------------------------

def cli(*args, cwd=None, timeout=300):
    return subprocess.run([*AFFECTPREP, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_cli_exit_codes(project, first_run, tmp_path):
    done = cli("run", "--config", str(project.path), "--scheduler", "inline", "--quiet")
    assert done.returncode == 3, done.stderr
    assert "sample(s) failed" in done.stdout
    status = cli("status", "--config", str(project.path), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)[0]["dataset"] == "demo"
    bad = cli("run", "--config", str(project.path), "--set", "faces.sise=3")
    assert bad.returncode == 2 and "unknown option" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = cli("run", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "no project file" in missing.stderr
    stage = cli("run", "--config", str(project.path), "--stage", "nope")
    assert stage.returncode == 2 and "unknown stage" in stage.stderr
    unknown = cli("status", "--config", str(project.path), "--dataset", "nope")
    assert unknown.returncode == 2 and "unknown dataset" in unknown.stderr
    compacted = cli("compact", "--config", str(project.path))
    assert compacted.returncode == 0 and "parts -> 1" in compacted.stdout
    again = run_pipeline(project, scheduler="inline", progress=False)
    assert all(s.ok == 0 and s.failed == 0 for s in again.stages)   # nothing redone after compaction
    assert again.failed == first_run.failed


def test_init_writes_every_option(tmp_path):
    from dataset_fixtures import make_dfew
    root = make_dfew(tmp_path / "DFEW")
    config = tmp_path / "affectprep.toml"
    out = cli("init", "dfew", "--root", str(root), "--config", str(config))
    assert out.returncode == 0, out.stderr
    text = config.read_text()
    assert "[datasets.dfew]" in text and "[stages.faces]" in text and "num_frames = 16" in text
    again = cli("init", "dfew", "--root", str(root), "--config", str(config))
    assert again.returncode == 2 and "already has a dataset" in again.stderr
    assert cli("init", "nope", "--root", str(root), "--config", str(config)).returncode == 2


# ---- killed and resumed --------------------------------------------------------------------------------------------

def test_sigkill_half_way_then_rerun_completes_every_sample_exactly_once(tmp_path):
    project = make_project(tmp_path, clips=21)
    proc = subprocess.Popen([*AFFECTPREP, "run", "--config", str(project.path), "--workers", "1",
                             "--batch-size", "1", "--quiet"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    faces_root = tmp_path / "cache" / "demo" / "faces"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(faces_root.glob("*/part-*.parquet"))) < 1:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, st = stores(project)
    half = len(st["faces"].statuses())
    assert 1 <= half < 21, "the kill should land half-way"
    assert not list(tmp_path.rglob("part-*.parquet.tmp"))
    report = run_pipeline(project, workers=1, progress=False)
    index, st = stores(project)
    expected = {r["sample_id"] for r in index.read(["sample_id", "media_kind"], status="ok").to_pylist()}
    for name in ("frames", "faces"):
        ids = [sid for t in st[name].iter_tables(["sample_id"]) for sid in t.column("sample_id").to_pylist()]
        assert len(ids) == len(set(ids)), f"{name}: a sample was read back twice"
        raw = sum(pq.read_metadata(p).num_rows for p in st[name].parts())
        assert raw == len(ids), f"{name}: a sample was processed twice"
    assert set(st["frames"].statuses()) == expected
    faces = next(s for s in report.stages if s.stage == "faces")
    assert faces.done_before == half
    assert faces.ok + faces.failed + faces.blocked == faces.total - half, "the rerun did only what was left"


# ---- a real dask.distributed cluster ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_same_dag_on_an_external_dask_cluster(tmp_path):
    project = make_project(tmp_path, clips=7)
    dask = str(Path(sys.executable).parent / "dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "1",
                                       "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
        out = cli("run", "--config", str(project.path), "--scheduler", address, "--quiet")
        assert out.returncode == 3, out.stderr  # the bad samples fail; everything else is done
        info = describe(load_project(project.path))[0]
        faces = {s["stage"]: s for s in info["stages"]}["faces"]
        assert faces["pending"] == 0 and faces["done"] == 7 + 1  # 7 demo clips + the short one
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)


def test_two_cluster_workers_write_their_parts_and_one_killed_half_way_loses_nothing(tmp_path):
    """Two `dask worker` processes share the cache and write the parts themselves; one is SIGKILLed half-way.
    After a rerun every sample is stored exactly once, no part is corrupt, and no temporary file counts as data."""
    project = make_project(tmp_path, clips=21)
    dask = str(Path(sys.executable).parent / "dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              **quiet)]
    try:
        workers = [subprocess.Popen([dask, "worker", address, "--no-nanny", "--nthreads", "1", "--no-dashboard"],
                                    **quiet) for _ in range(2)]
        procs += workers
        from distributed import Client
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
        run = subprocess.Popen([*AFFECTPREP, "run", "--config", str(project.path), "--scheduler", address,
                                "--stage", "faces", "--batch-size", "1", "--quiet"], **quiet)
        faces_root = tmp_path / "cache" / "demo" / "faces"
        deadline = time.time() + 240
        while time.time() < deadline and not list(faces_root.glob("*/part-*.parquet")):
            time.sleep(0.05)
        workers[0].kill()   # SIGKILL, mid-task
        workers[0].wait()
        assert run.wait(300) in (0, 3)   # the other worker finished the run (the bad samples fail)
        rerun = subprocess.run([*AFFECTPREP, "run", "--config", str(project.path), "--scheduler", address,
                                "--stage", "faces", "--quiet"], capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 3, rerun.stderr
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait(30)
    index, st = stores(project)
    expected = set(index.read(["sample_id"], status="ok").column("sample_id").to_pylist())
    for name in ("frames", "faces"):
        store = st[name]
        if name == "faces":   # the samples whose frames are ok (an unreadable video blocks its faces)
            expected = {sid for sid, status in st["frames"].statuses().items() if status == "ok"}
        assert not store.corrupt_parts()
        for part in store.parts():
            pq.read_table(part)   # every part is whole Parquet
        # A killed worker's temporary file is never a part; the next writer's lock removes it (the rerun takes a
        # store's lock only when that store has work left, which depends on where the kill fell).
        assert not any(part.name.endswith(".tmp") for part in store.parts())
        with store.lock():
            pass
        assert not list(store.path.glob(".*.tmp")), "the lock removes the killed worker's temporary files"
        ids = [sid for t in store.iter_tables(["sample_id"]) for sid in t.column("sample_id").to_pylist()]
        assert len(ids) == len(set(ids)), f"{name}: a sample was read back twice"
        assert set(ids) == expected, f"{name}: samples missing after the rerun"
        with store.lock():
            store.compact()
        raw = sum(pq.read_metadata(p).num_rows for p in store.parts())
        assert raw == len(expected), f"{name}: a sample is stored more than once"
    faces = {s["stage"]: s for s in describe(load_project(project.path))[0]["stages"]}["faces"]
    assert faces["pending"] == 0 and faces["done"] == 21 + 1


def test_unreachable_scheduler_is_a_config_error(project):
    out = cli("run", "--config", str(project.path), "--scheduler", f"tcp://127.0.0.1:{_free_port()}",
              "--retry-failed", timeout=120)
    assert out.returncode == 2 and "cannot reach the Dask scheduler" in out.stderr


def test_frame_folders_are_media_like_videos(tmp_path):
    import shutil
    from dataset_fixtures import make_dfew
    from media_fixtures import frame_folder
    root = make_dfew(tmp_path / "DFEW", codes=(1, 5), frames=True)
    for folder in (root / "Clip" / "clip_224x224").iterdir():
        shutil.rmtree(folder)
        frame_folder(folder, num_frames=20)
    from affectprep.config import DatasetConfig, ProjectConfig
    project = ProjectConfig(None, tmp_path / "cache", {"f": DatasetConfig("f", "dfew", root,
                                                                          {"media": "Clip/clip_224x224"})},
                            {"faces": {"backend": "haar"}})
    report = run_pipeline(project, "faces", scheduler="inline", progress=False)
    assert report.failed == 0 and report.stages[-1].ok == 2
    index = ensure_index(project, project.datasets["f"])
    frames = {p.stage.name: p.store for p in plan_stages(project, index, None)}["frames"]
    assert {r["decoder"] for r in frames.read(["decoder"]).to_pylist()} == {"folder"}


def test_a_second_writer_is_refused_with_a_one_line_reason(project, first_run):
    index, _ = stores(project)
    with index.lock():
        out = cli("run", "--config", str(project.path), "--scheduler", "inline", "--quiet")
    assert out.returncode == 2 and "is being written by pid" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_stages_with_a_model_on_cuda_ask_cluster_workers_for_a_gpu():
    import dataclasses

    from affectprep.pipeline.stages import STAGES

    on_device = [name for name, cls in STAGES.items() if "device" in {f.name for f in dataclasses.fields(cls.Config)}]
    assert {"faces", "captions", "cate", "features", "text_features", "audio_features"} <= set(on_device)
    for name in on_device:
        cls = STAGES[name]
        assert cls(cls.Config()).resources() == {}, name
        assert cls(dataclasses.replace(cls.Config(), device="cuda:1")).resources() == {"GPU": 1}, name
    assert STAGES["frames"](STAGES["frames"].Config()).resources() == {}
