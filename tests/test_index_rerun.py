"""Rebuilding the index on a rerun: media an earlier index found usable are not checked again, a repaired sample
turns ok, and the rows stored are exactly those that changed (compared in Arrow, checked here against a plain
JSON comparison of every row)."""
from __future__ import annotations

import json
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import image_dataset_fixtures as F
from affectprep import schema as S
from affectprep.config import DatasetConfig, ProjectConfig
from affectprep.pipeline.dag import changed_rows, ensure_index, run_pipeline
from affectprep.pipeline.datasets import make_adapter
from affectprep.pipeline.datasets.base import BadSample
from affectprep.store import Store, list_keys


def rafdb_project(tmp_path):
    root = F.make_rafdb(tmp_path / "RAF")
    return ProjectConfig(tmp_path / "affectprep.toml", tmp_path / "cache", {"raf": DatasetConfig("raf", "rafdb", root)},
                         {}), root


def statuses(store):
    return {r["sample_id"]: (r["status"], r["error"]) for r in store.read(["sample_id", "status", "error"]).to_pylist()}


def test_a_rerun_trusts_checked_media_and_the_stage_that_reads_a_deleted_one_fails_it(tmp_path):
    project, root = rafdb_project(tmp_path)
    run_pipeline(project, "frames", scheduler="inline", progress=False)
    before = ensure_index(project, project.datasets["raf"])
    parts = before.parts()
    (root / "Image" / "aligned" / "train_00001_aligned.jpg").unlink()   # checked ok by the first index
    index = ensure_index(project, project.datasets["raf"])
    assert index.parts() == parts, "nothing changed as far as the index can tell: nothing written"
    assert statuses(index)["train_00001"] == ("ok", None)
    # The annotations edited: a new index, still without checking the media of the rows it had.
    labels = root / "EmoLabel" / "list_patition_label.txt"
    labels.write_text(labels.read_text() + "train_00005.jpg 4\n")
    F.write_face(root / "Image" / "aligned" / "train_00005_aligned.jpg", "happy", 5, (100, 100))
    report = run_pipeline(project, "frames", scheduler="inline", progress=False)
    edited = ensure_index(project, project.datasets["raf"])
    assert edited.key != index.key and statuses(edited)["train_00005"] == ("ok", None)
    assert statuses(edited)["train_00001"] == ("ok", None)
    frames = next(s for s in report.stages if s.stage == "frames")
    assert frames.ok == 1 and frames.failed == 0, "only the new image is new work for frames"
    # The sample whose image went missing fails where it is read, with a readable error, once it is redone.
    frames_store = Store(project.cache, "raf", "frames", list_keys(project.cache, "raf", "frames")[0])
    shutil.rmtree(frames_store.path)
    run_pipeline(project, "frames", scheduler="inline", progress=False)
    status, error = statuses(frames_store)["train_00001"]
    assert status == "failed" and "train_00001_aligned.jpg" in error


def test_a_failed_sample_is_checked_again_and_turns_ok_once_repaired(tmp_path):
    project, root = rafdb_project(tmp_path)
    index = ensure_index(project, project.datasets["raf"])
    assert statuses(index)[F.RAFDB_MISSING][0] == "failed"
    assert statuses(index)[F.RAFDB_CORRUPT][0] == "failed"
    F.write_face(root / "Image" / "aligned" / f"{F.RAFDB_MISSING}_aligned.jpg", "disgust", 9, (100, 100))
    F.write_face(root / "Image" / "aligned" / f"{F.RAFDB_CORRUPT}_aligned.jpg", "fear", 9, (100, 100))
    parts = len(index.parts())
    index = ensure_index(project, project.datasets["raf"])
    assert statuses(index)[F.RAFDB_MISSING] == ("ok", None) and statuses(index)[F.RAFDB_CORRUPT] == ("ok", None)
    assert len(index.parts()) == parts + 1
    written = index.parts()[-1]
    assert sorted(pq.read_table(written, columns=["sample_id"]).column("sample_id").to_pylist()) == sorted(
        [F.RAFDB_MISSING, F.RAFDB_CORRUPT]), "only the two repaired rows are written"


def test_checked_media_skip_the_checks_an_unchecked_path_still_gets(tmp_path):
    root = F.make_rafdb(tmp_path / "RAF")
    adapter = make_adapter("rafdb", root)
    missing = str(adapter.root / "Image" / "aligned" / f"{F.RAFDB_MISSING}_aligned.jpg")
    adapter.checked_media = {f"Image/aligned/{F.RAFDB_MISSING}_aligned.jpg": "image"}   # as the index stores it
    rows = {r["sample_id"]: r for r in adapter.rows()}
    assert rows[F.RAFDB_MISSING]["status"] == "ok" and rows[F.RAFDB_MISSING]["media_path"] == missing
    assert rows[F.RAFDB_CORRUPT]["status"] == "failed", "a path not listed is checked as before"


def _reference_changed(new: pa.Table, old: pa.Table) -> list[int]:
    """A plain comparison: each row as JSON text (NaN written as NaN, so equal to itself)."""
    stored = {r["sample_id"]: json.dumps(r, sort_keys=True) for r in old.to_pylist()}
    return [i for i, r in enumerate(new.to_pylist()) if stored.get(r["sample_id"]) != json.dumps(r, sort_keys=True)]


def _row(sid, **fields):
    return {**{name: None for name in S.INDEX.names}, "sample_id": sid, "status": "ok", **fields}


def test_changed_rows_agree_with_a_plain_row_by_row_comparison():
    nan = math.nan
    old_rows = [_row("a", label=1, au=[1.0, nan, 0.0]), _row("b", label=2, labels=[2]), _row("c", media_path="x"),
                _row("d", au=[0.0, 1.0]), _row("e", labels=[1, 2]), _row("f", frame_end=-1), _row("g", au=None),
                _row("h", au=[nan])]
    new_rows = [_row("h", au=[nan]),                 # unchanged, NaN in a list
                _row("a", label=1, au=[1.0, nan, 0.0]),   # unchanged, another position
                _row("b", label=3, labels=[2]),      # a scalar changed
                _row("c", media_path=None),           # set to null
                _row("d", au=[0.0, 0.0]),             # one list value changed
                _row("e", labels=[1, 2, 3]),          # a list grew
                _row("f", frame_end=-1, status="failed", error="x"),
                _row("g", au=[]),                     # null list -> empty list
                _row("z", label=0)]                   # new
    old = pa.Table.from_pylist(old_rows, schema=S.INDEX)
    new = pa.Table.from_pylist(new_rows, schema=S.INDEX)
    assert changed_rows(new, old).to_pylist() == _reference_changed(new, old) == [2, 3, 4, 5, 6, 7, 8]
    assert changed_rows(old, old).to_pylist() == []


@pytest.mark.parametrize("chunked", [False, True])
def test_changed_rows_read_chunked_tables(chunked):
    rows = [_row(f"s{i}", label=i % 3, au=[float(i % 2)]) for i in range(40)]
    old = pa.Table.from_pylist(rows, schema=S.INDEX)
    edited = [dict(r) for r in rows]
    edited[7]["label"], edited[31]["au"] = 9, [5.0]
    new = pa.Table.from_pylist(edited, schema=S.INDEX)
    if chunked:
        new = pa.concat_tables([new.slice(0, 13), new.slice(13)])
        old = pa.concat_tables([old.slice(0, 20), old.slice(20)])
    assert changed_rows(new, old).to_pylist() == [7, 31]


def test_a_checked_path_outside_the_folder_an_option_names_is_still_refused(tmp_path):
    """An index made with images = "original" lists Image/original/...; an aligned-layout line reaching there with
    `..` is refused as before, listed or not."""
    adapter = make_adapter("rafdb", F.make_rafdb(tmp_path / "RAF"))
    adapter.checked_media = {"Image/original/train_00001.jpg": "image"}
    aligned = adapter.root / "Image" / "aligned"
    assert adapter.checked_path(aligned, "../original/train_00001.jpg") is None
    with pytest.raises(BadSample, match="resolves outside"):
        adapter.inside(aligned, "../original/train_00001.jpg")
