import multiprocessing as mp

import numpy as np
import pyarrow.parquet as pq
import pytest

from affectprep import schema as S
from affectprep.store import (COMPACT_PARTS, GROUP_ROWS, INDEX_FILE, SMALL_PART_BYTES, SchemaMismatch, Store,
                              StoreLocked, list_keys)


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


# ---- the status index ------------------------------------------------------------------------------------------

def _written(tmp_path, n=40, per_part=4):
    store = Store(tmp_path, "ds", "frames", "k1")
    with store.lock():
        for i in range(0, n, per_part):
            store.write([frames_row(f"s{j:03d}", "failed" if j % 7 == 0 else "ok", "bad" if j % 7 == 0 else None)
                         for j in range(i, i + per_part)])
    return store


def test_a_deleted_or_unreadable_status_index_is_rebuilt_from_the_parts(tmp_path):
    store = _written(tmp_path)
    index = store.path / INDEX_FILE
    assert index.exists(), "the lock holder saves the index"
    expected = Store(tmp_path, "ds", "frames", "k1").statuses()
    assert len(expected) == 40 and expected["s007"] == "failed"
    index.unlink()
    assert Store(tmp_path, "ds", "frames", "k1").statuses() == expected
    index.write_bytes(b"not parquet")
    fresh = Store(tmp_path, "ds", "frames", "k1")
    assert fresh.statuses() == expected
    assert sorted(fresh.read(["sample_id"]).column("sample_id").to_pylist()) == sorted(expected)
    assert not fresh.corrupt_parts(), "an unreadable index is a cache to rebuild, not a corrupt part"


def test_a_few_small_parts_are_left_to_the_readers_and_many_are_written_into_the_index(tmp_path):
    store = _written(tmp_path)
    saved = (store.path / INDEX_FILE).read_bytes()
    with store.lock():
        store.write([frames_row("late")])
    assert (store.path / INDEX_FILE).read_bytes() == saved, "one small part: the 40-row index is not rewritten"
    fresh = Store(tmp_path, "ds", "frames", "k1")
    assert len(fresh.statuses()) == 41 and fresh.read(["sample_id"], ids=["late"]).num_rows == 1
    with store.lock():
        for i in range(COMPACT_PARTS):
            store.write([frames_row(f"later{i}")])
    table = pq.read_table(store.path / INDEX_FILE)
    assert table.num_rows == 41 + COMPACT_PARTS, "past a handful of parts the index covers them again"
    assert len(Store(tmp_path, "ds", "frames", "k1").statuses()) == 41 + COMPACT_PARTS


def test_parts_added_behind_the_index_back_are_read(tmp_path):
    store = _written(tmp_path)
    saved = (store.path / INDEX_FILE).read_bytes()
    # Written by another process without the lock (a worker): the index on disk does not know these parts.
    other = Store(tmp_path, "ds", "frames", "k1")
    other.write([frames_row("s007"), frames_row("new")])
    assert (store.path / INDEX_FILE).read_bytes() == saved
    for reader in (store, Store(tmp_path, "ds", "frames", "k1")):   # a stale in-memory index, and the stale file
        statuses = reader.statuses()
        assert statuses["s007"] == "ok" and statuses["new"] == "ok" and len(statuses) == 41
        rows = reader.read(["sample_id", "status"], ids=["s007", "new", "s001"]).to_pylist()
        assert sorted(r["sample_id"] for r in rows) == ["new", "s001", "s007"]
        assert {r["sample_id"]: r["status"] for r in rows}["s007"] == "ok"
    # A part the index covers that is gone (moved aside by hand) rebuilds it.
    gone = store.parts()[0]
    gone.rename(gone.with_name("elsewhere"))
    assert len(Store(tmp_path, "ds", "frames", "k1").statuses()) == 41 - 4


def test_compaction_of_many_parts_gives_few_large_row_groups_and_the_same_rows(tmp_path):
    store = _written(tmp_path, n=2000, per_part=4)
    store.write([frames_row("s003", "failed", "redone")])   # a newer row for one sample
    before = sorted(store.read().to_pylist(), key=lambda r: r["sample_id"])
    with store.lock():
        assert store.compact() == 501
    parts = store.parts()
    assert len(parts) == 1 and pq.ParquetFile(parts[0]).metadata.num_row_groups == 1
    fresh = Store(tmp_path, "ds", "frames", "k1")
    assert sorted(fresh.read().to_pylist(), key=lambda r: r["sample_id"]) == before
    assert fresh.read(["error"], ids=["s003"]).to_pylist() == [{"error": "redone"}]


def test_parts_of_large_rows_are_not_small_however_few_their_rows(tmp_path):
    store = Store(tmp_path, "ds", "faces", "k1")
    rng = np.random.default_rng(0)   # incompressible crops of 1 MiB, as JPEGs are
    with store.lock():
        store.write([{"sample_id": f"c{i}", "status": "ok", "crops": [rng.bytes(1 << 20)]}
                     for i in range((SMALL_PART_BYTES >> 20) + 1)])
        big = set(store.parts())
        for i in range(70):
            store.write([{"sample_id": f"d{i}", "status": "ok", "crops": [b"x"]}])
        assert store.needs_compaction()
        assert store.compact(small_only=True) == 70
    assert big < set(store.parts()) and len(store.parts()) == 2


def test_a_run_compacts_only_its_small_parts(tmp_path):
    store = _written(tmp_path, n=2 * GROUP_ROWS, per_part=GROUP_ROWS)   # two parts of a full row group
    big = set(store.parts())
    with store.lock():
        for i in range(70):
            store.write([frames_row(f"t{i}")])
        assert store.needs_compaction()
        assert store.compact(small_only=True) == 70
    assert big < set(store.parts()) and len(store.parts()) == 3
    assert len(Store(tmp_path, "ds", "frames", "k1").statuses()) == 2 * GROUP_ROWS + 70
