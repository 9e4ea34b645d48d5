"""The store's completion and read costs at scale, with the write pattern a run produces (4 rows per task), before
and after `compact`: the table of issue 15. Uses only the public Store API, so it measures any checkout.
Each figure is taken on a fresh Store object (no in-memory cache from an earlier call).
Usage: python bench/bench_store.py [--samples 40000 160000] [--rows-per-part 4]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from affectprep.store import Store


def frames_row(sid: str) -> dict:
    return {"sample_id": sid, "status": "ok", "error": None, "input_digest": "d" * 16,
            "frame_indices": list(range(16)), "num_views": 1, "frames_per_view": 16, "num_source_frames": 16,
            "fps": 25.0, "width": 64, "height": 48, "padded": False, "decoder": "pyav"}


def build(cache: Path, samples: int, rows_per_part: int) -> Store:
    store = Store(cache, "bench", "frames", "k")
    ids = [f"s{i:07d}" for i in range(samples)]
    with store.lock():
        for i in range(0, samples, rows_per_part):
            store.write([frames_row(s) for s in ids[i:i + rows_per_part]])
    return store


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(cache: Path) -> dict[str, float]:
    fresh = lambda: Store(cache, "bench", "frames", "k")   # noqa: E731
    some_ids = [f"s{i:07d}" for i in range(0, 4000, 40)]
    return {
        "statuses": seconds(lambda: fresh().statuses()),
        "read_ids": seconds(lambda: fresh().read(["sample_id", "status"], ids=some_ids)),
        "read_all": seconds(lambda: fresh().read(["sample_id", "num_source_frames"])),
    }


def row_groups(store: Store) -> int:
    import pyarrow.parquet as pq
    return sum(pq.ParquetFile(p).metadata.num_row_groups for p in store.parts())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, nargs="+", default=[40_000])
    parser.add_argument("--rows-per-part", type=int, default=4)
    args = parser.parse_args()
    print("| samples | part files | row groups | `statuses()` | first read by ids | read all, 2 columns |")
    print("|---|---|---|---|---|---|")
    for n in args.samples:
        work = Path(tempfile.mkdtemp(prefix="bench-store-"))
        try:
            store = build(work, n, args.rows_per_part)
            for label in ("", " after `compact`"):
                if label:
                    with store.lock():
                        store.compact()
                m = measure(work)
                print(f"| {n:,}{label} | {len(store.parts()):,} | {row_groups(store):,} | {m['statuses']:.2f} s "
                      f"| {m['read_ids']:.2f} s | {m['read_all']:.2f} s |", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
