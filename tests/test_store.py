import multiprocessing as mp

import pyarrow.parquet as pq
import pytest

from affectprep import schema as S
from affectprep.store import SchemaMismatch, Store, StoreLocked, list_keys


def frames_row(sid, status="ok", error=None, n=16):
    return {"sample_id": sid, "status": status, "error": error, "frame_indices": list(range(n)), "num_views": 1,
            "frames_per_view": n, "num_source_frames": n, "fps": 25.0, "width": 64, "height": 48,
            "padded": False, "decoder": "pyav"}


def test_write_read_roundtrip_keeps_schema_and_version(tmp_path):
    store = Store(tmp_path, "ds", "frames", "k1")
    part = store.write([frames_row("a"), frames_row("b", "failed", "broken file")])
    meta = pq.read_schema(part).metadata
    assert meta[b"affectprep.schema_version"] == str(S.SCHEMA_VERSION).encode()
    assert meta[b"affectprep.stage"] == b"frames"
    t = store.read()
    assert t.schema.names == S.FRAMES.names
    assert store.statuses() == {"a": "ok", "b": "failed"}
    assert store.read(["sample_id", "error"], status="failed").to_pylist() == [{"sample_id": "b",
                                                                             "error": "broken file"}]
    assert not list(tmp_path.rglob("*.tmp"))


def test_newest_row_wins_so_each_sample_reads_back_once(tmp_path):
    store = Store(tmp_path, "ds", "frames", "k1")
    store.write([frames_row("a", "failed", "timeout"), frames_row("b")])
    store.write([frames_row("a")])
    t = store.read(["sample_id", "status"])
    assert sorted(t.to_pylist(), key=lambda r: r["sample_id"]) == [
        {"sample_id": "a", "status": "ok"}, {"sample_id": "b", "status": "ok"}]
    assert store.read(["sample_id"], ids=["b"]).column("sample_id").to_pylist() == ["b"]


def test_rows_outside_the_schema_are_rejected(tmp_path):
    store = Store(tmp_path, "ds", "frames", "k1")
    with pytest.raises(Exception):
        store.write([{"sample_id": "a", "status": "ok", "error": None, "frame_indices": "not a list"}])
    assert store.parts() == []


def _hold_lock(path, ready, release):
    store = Store(path, "ds", "frames", "k1")
    with store.lock():
        ready.set()
        release.wait(10)


def test_lock_stops_a_second_writer_and_dies_with_its_holder(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    assert ready.wait(20)
    store = Store(tmp_path, "ds", "frames", "k1")
    with pytest.raises(StoreLocked, match=f"pid {holder.pid}"):
        with store.lock():
            pass
    holder.kill()  # SIGKILL: the kernel drops the flock
    holder.join()
    with store.lock():
        pass


def test_schema_version_mismatch_is_a_clear_error(tmp_path):
    store = Store(tmp_path, "ds", "frames", "k1")
    part = store.write([frames_row("a")])
    table = pq.read_table(part)
    table = table.replace_schema_metadata({b"affectprep.schema_version": b"0"})
    pq.write_table(table, part)
    with pytest.raises(SchemaMismatch, match="schema version 0"):
        store.statuses()


def test_keys_are_listed_side_by_side(tmp_path):
    Store(tmp_path, "ds", "frames", "k1").write([frames_row("a")])
    Store(tmp_path, "ds", "frames", "k2").write([frames_row("a")])
    assert sorted(list_keys(tmp_path, "ds", "frames")) == ["k1", "k2"]


def test_compaction_keeps_the_newest_row_of_each_sample_in_one_part(tmp_path):
    store = Store(tmp_path, "ds", "frames", "k1")
    store.write([frames_row("a", "failed", "timeout"), frames_row("b")])
    store.write([frames_row("c")])
    store.write([frames_row("a")])
    before = sorted(store.read().to_pylist(), key=lambda r: r["sample_id"])
    with store.lock():
        assert store.compact() == 3
    assert len(store.parts()) == 1 and not list(tmp_path.rglob("*.tmp"))
    assert sorted(store.read().to_pylist(), key=lambda r: r["sample_id"]) == before
    assert store.statuses() == {"a": "ok", "b": "ok", "c": "ok"}
    assert pq.read_schema(store.parts()[0]).metadata[b"affectprep.schema_version"] == str(S.SCHEMA_VERSION).encode()
    with store.lock():
        assert store.compact() == 0
