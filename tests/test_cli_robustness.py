"""What a user can get wrong, or what can go wrong under them, ends in one line and keeps the work done: corrupt
part files, a full disk, read-only caches, Ctrl-C, bad options, leftovers of killed runs."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from affectprep.config import load_project
from affectprep.pipeline.dag import DatasetPlan, ensure_index, run_pipeline

from pipeline_fixtures import make_project

AFFECTPREP = [sys.executable, "-m", "affectprep.cli"]


def cli(*args, env=None, timeout=600):
    return subprocess.run([*AFFECTPREP, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line(out) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def stores(project):
    ds = project.datasets["demo"]
    return {p.stage.name: p.store for p in DatasetPlan(project, ds, ensure_index(project, ds)).stages}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("robust"), clips=7)
    run_pipeline(project, "faces", scheduler="inline", progress=False)
    return project


def test_corrupt_parts_are_moved_aside_reported_and_their_samples_redone(project):
    faces = stores(project)["faces"]
    done = {sid for sid, status in faces.statuses().items() if status == "ok"}
    victim = faces.parts()[0]
    lost = set(pq.read_table(victim, columns=["sample_id"]).column("sample_id").to_pylist())
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])       # a copy cut short
    (faces.path / "part-99999999999999999999-1-zerobyte.parquet").write_bytes(b"")
    (faces.path / "part-99999999999999999999-2-garbage.parquet").write_bytes(os.urandom(3000))
    status = cli("status", "--config", str(project.path))
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert status.stdout.count("corrupt part moved aside") == 3
    assert len(faces.corrupt_parts()) == 3 and victim not in faces.parts()
    run = cli("run", "--config", str(project.path), "--stage", "faces", "--scheduler", "inline", "--quiet")
    assert run.returncode == 3 and "Traceback" not in run.stderr, run.stderr   # 3: the fixture's bad clips
    after = {sid for sid, status in stores(project)["faces"].statuses().items() if status == "ok"}
    assert after == done and lost, "the samples of the corrupt part are redone, the others kept"
    assert cli("compact", "--config", str(project.path)).returncode == 0


def test_read_only_commands_write_nothing(project):
    def snapshot():
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in project.cache.rglob("*"))

    before = snapshot()
    for command in (("status",), ("status", "--json"), ("text", "list")):
        out = cli(*command, "--config", str(project.path))
        assert out.returncode == 0, out.stderr
    assert snapshot() == before


def test_a_truncated_store_config_does_not_stop_a_listing(project):
    config = stores(project)["faces"].path / "config.json"
    saved = config.read_text()
    config.write_text(saved[: len(saved) // 2])
    try:
        assert cli("text", "list", "--config", str(project.path)).returncode == 0
        assert cli("status", "--config", str(project.path)).returncode == 0
    finally:
        config.write_text(saved)


def test_a_full_disk_is_one_line_and_keeps_what_was_written(project, monkeypatch, capsys, tmp_path):
    from affectprep import cli as affectprep_cli

    fresh = make_project(tmp_path, clips=7)
    real = pq.write_table
    calls = {"n": 0}

    def full_after_three(table, where, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, **kwargs)

    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):   # --quiet sets them: restored after
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setattr("affectprep.store.pq.write_table", full_after_three)
    monkeypatch.setattr(sys, "argv", ["affectprep", "run", "--config", str(fresh.path), "--scheduler", "inline",
                                      "--quiet", "--batch-size", "1"])
    with pytest.raises(SystemExit) as exit_:
        affectprep_cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "free some space" in err[0]
    monkeypatch.setattr("affectprep.store.pq.write_table", real)
    written = sum(len(s.statuses()) for name, s in stores(fresh).items() if name != "index")
    assert written >= 1, "what was written before the disk filled up is kept"


def test_options_out_of_range_and_bad_addresses_are_one_line(project):
    for args, expected in ((("--workers", "-1"), "workers"), (("--limit", "-1"), "limit"),
                           (("--limit", "0"), "limit"), (("--scheduler", "foo://bar"), "scheduler"),
                           (("--set", "frames.num_frames=0"), "num_frames")):
        out = cli("run", "--config", str(project.path), *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and expected in out.stderr.lower(), (args, out.stderr)


def test_index_is_a_stage_run_can_stop_at(tmp_path):
    fresh = make_project(tmp_path, clips=7)
    out = cli("run", "--config", str(fresh.path), "--stage", "index", "--quiet")
    assert out.returncode == 3, out.stderr         # the fixture's index holds failed rows
    assert ensure_index(fresh, fresh.datasets["demo"]).exists()
    assert not (fresh.cache / "demo" / "frames").exists()


def test_init_help_lists_every_dataset_kind():
    from affectprep.pipeline.datasets import ADAPTERS
    out = cli("init", "--help", env={"COLUMNS": "400"})
    assert out.returncode == 0
    assert all(kind in out.stdout for kind in ADAPTERS), out.stdout
    from affectprep.cli import DATASET_KINDS
    assert sorted(DATASET_KINDS) == sorted(ADAPTERS)


def test_orphan_temporary_files_of_killed_runs_are_removed(project):
    faces = stores(project)["faces"]
    orphan = faces.path / ".part-00000000000000000001-1-dead.parquet.tmp"
    orphan.write_bytes(b"half a part")
    run_pipeline(project, "faces", scheduler="inline", progress=False, retry_failed=True)
    assert not orphan.exists()


def test_ctrl_c_stops_with_one_line_and_a_rerun_goes_on(tmp_path):
    fresh = make_project(tmp_path, clips=14)
    proc = subprocess.Popen([*AFFECTPREP, "run", "--config", str(fresh.path), "--workers", "2", "--batch-size", "1",
                             "--quiet"], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    faces = tmp_path / "cache" / "demo" / "faces"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(faces.glob("*/part-*.parquet"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)                  # what a terminal sends to the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == [
        "affectprep: interrupted; every sample already written is kept, run the same command again to go on"]
    kept = len(stores(fresh)["faces"].statuses())
    assert kept >= 2
    report = run_pipeline(load_project(fresh.path), scheduler="inline", progress=False)
    assert next(s for s in report.stages if s.stage == "faces").done_before == kept


def test_quiet_silences_model_loading_reports(project, tmp_path):
    import torch
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    encoder = tmp_path / "videomae"
    VideoMAEModel(VideoMAEConfig(image_size=32, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
                  ).save_pretrained(encoder)
    shutil.rmtree(project.cache / "demo" / "features", ignore_errors=True)
    setting = f"features.video_encoder={encoder}"
    quiet = cli("run", "--config", str(project.path), "--stage", "features", "--set", setting, "--quiet",
                "--scheduler", "inline")
    assert quiet.returncode == 3 and "Loading weights" not in quiet.stderr + quiet.stdout, quiet.stderr
    shutil.rmtree(project.cache / "demo" / "features", ignore_errors=True)
    loud = cli("run", "--config", str(project.path), "--stage", "features", "--set", setting, "--scheduler", "inline",
               env={"HF_HUB_DISABLE_PROGRESS_BARS": "", "TRANSFORMERS_VERBOSITY": "warning"})
    assert "Loading weights" in loud.stderr          # what --quiet took away was there


def test_a_run_beside_another_cluster_prints_nothing_about_ports(tmp_path):
    """Two runs on one machine: the second's scheduler does not reach for the port the first one holds."""
    fresh = make_project(tmp_path, clips=2)
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 8787))   # what a first run (or any Dask dashboard) holds
        held.listen()
    except OSError:
        pass                              # held already, by something else on this machine: the same situation
    try:
        out = cli("run", "--config", str(fresh.path), "--stage", "frames", "--workers", "1", "--quiet")
    finally:
        held.close()
    assert out.returncode == 3, out.stderr   # 3: the fixture's bad clips
    assert out.stderr.strip() == "", out.stderr
