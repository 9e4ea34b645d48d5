"""A synthetic RAF-DB of N images (hard links to 4 small files) through the real pipeline (index, frames, faces with
the haar backend at 32 px, or --target), issue 15's targets: first run, a no-op rerun of every stage, `affectprep
status`, adding 1,000 images, client bytes received per sample, client peak RSS, and store reads by ids (what a
training loader does) as the run leaves the store vs after `compact`. Each run is a fresh process (ru_maxrss).
Usage: python bench/bench_pipeline_scale.py --samples 10000 300000 [--target faces] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from affectprep.config import DatasetConfig, ProjectConfig, write_project
from affectprep.pipeline.demo import render_frames

RUN = r"""
import json, resource, sys, time
from affectprep.config import load_project
from affectprep.pipeline.dag import run_pipeline
start = time.perf_counter()
report = run_pipeline(load_project(sys.argv[1]), sys.argv[2], workers=int(sys.argv[3]), progress=False)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "client_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "client_bytes": getattr(report, "client_bytes", None),
                  "new": sum(s.ok + s.failed for s in report.stages)}))
"""

LOADER = r"""
import json, random, sys, time
from affectprep.config import load_project
from affectprep.pipeline.dag import DatasetPlan, ensure_index
project = load_project(sys.argv[1])
ds = project.datasets["bench"]
plan = DatasetPlan(project, ds, ensure_index(project, ds), sys.argv[2])
store = plan.stages[-1].store
if sys.argv[3] == "compact":
    with store.lock():
        store.compact()
# What models/data.py's loader does: groups of samples as iter_tables yields them (a part's row group), shuffled,
# each read back by its ids.
# Epochs until two seconds have passed (at least three): a 10k store reads in milliseconds.
groups = [t.column("sample_id").to_pylist() for t in store.iter_tables(["sample_id"], status="ok")]
start = time.perf_counter()
n = epochs = 0
while epochs < 3 or time.perf_counter() - start < 2:
    random.Random(epochs).shuffle(groups)
    for group in groups:
        n += store.read(None, ids=group, status="ok").num_rows
    epochs += 1
print(json.dumps({"samples_per_s": n / (time.perf_counter() - start), "parts": len(store.parts())}))
"""


def make_dataset(root: Path, first: int, count: int) -> None:
    """RAF-DB's aligned layout; images are hard links to a few small JPEGs (32 copies of 4 faces: a file takes at
    most 65,000 links on ext4)."""
    media = root / "Image" / "aligned"
    media.mkdir(parents=True, exist_ok=True)
    sources = []
    for i in range(32):
        label = ("happy", "sad", "angry", "neutral")[i % 4]
        path = root / f"source{i}.jpg"
        if not path.exists():
            frames = render_frames(label, seed=i % 4, num_frames=3, size=(100, 100))
            cv2.imwrite(str(path), cv2.cvtColor(frames[1], cv2.COLOR_RGB2BGR))
        sources.append(path)
    codes = np.random.default_rng(first).integers(1, 8, count)
    lines = []
    for j, code in zip(range(first, first + count), codes):
        name = f"train_{j:07d}"
        os.link(sources[j % len(sources)], media / f"{name}_aligned.jpg")
        lines.append(f"{name}.jpg {code}")
    labels = root / "EmoLabel" / "list_patition_label.txt"
    labels.parent.mkdir(parents=True, exist_ok=True)
    with open(labels, "a") as f:
        f.write("\n".join(lines) + "\n")


def run(config: Path, target: str, workers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", RUN, str(config), target, str(workers)], capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def loader(config: Path, target: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOADER, str(config), target, mode], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, nargs="+", default=[10_000])
    parser.add_argument("--target", default="faces")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    affectprep = str(Path(sys.executable).parent / "affectprep")
    for n in args.samples:
        work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
        try:
            root = work / "RAFDB"
            make_dataset(root, 0, n)
            project = ProjectConfig(work / "affectprep.toml", work / "cache",
                                    {"bench": DatasetConfig("bench", "rafdb", root)},
                                    {"faces": {"backend": "haar", "size": 32}})
            write_project(project)
            first = run(project.path, args.target, args.workers)
            per = first["client_bytes"] / max(1, first["new"]) if first["client_bytes"] is not None else None
            print(f"{n:,} samples, first run: {first['seconds']:.1f} s for {first['new']:,} stage rows; client "
                  f"peak RSS {first['client_mib']:.0f} MiB; client received "
                  f"{'n/a (rows travel to the client)' if per is None else f'{per:.0f} B per stage row'}",
                  flush=True)
            again = run(project.path, args.target, args.workers)
            print(f"  no-op rerun of every stage: {again['seconds']:.1f} s ({again['new']} rows)", flush=True)
            start = time.perf_counter()
            status = subprocess.run([affectprep, "status", "--config", str(project.path)], capture_output=True)
            print(f"  affectprep status: {time.perf_counter() - start:.1f} s (exit {status.returncode})", flush=True)
            make_dataset(root, n, 1000)
            added = run(project.path, args.target, args.workers)
            work_s = first["seconds"] / max(1, n) * 1000
            print(f"  adding 1,000 images: {added['seconds']:.1f} s ({added['new']} rows; the first run's rate gives "
                  f"{work_s:.1f} s for them: overhead ~{added['seconds'] - work_s:.1f} s)", flush=True)
            as_left = loader(project.path, args.target, "as-left")
            compacted = loader(project.path, args.target, "compact")
            print(f"  loader reads (shuffled row groups, by ids): {as_left['samples_per_s']:.0f} samples/s as the run left the store "
                  f"({as_left['parts']} parts), {compacted['samples_per_s']:.0f} after compact "
                  f"({compacted['parts']} parts)", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
