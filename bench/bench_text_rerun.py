"""`captions` + `cate` through the real DAG against the local OpenAI-compatible test server, over N clips:

1. the first run (every request sent), then a rerun with the stores intact (nothing to do);
2. a rerun after deleting the text stores, where every answer comes from the response cache.
Targets: the reruns send 0 requests and finish in under 10 s over 1,000 clips.

The vision stores are made by copying one real processed clip N times (media and rows), so the figures are about
the text stages alone. Usage: python bench/bench_text_rerun.py [--clips 1000]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from affectprep.config import load_project
from affectprep.pipeline.dag import ensure_index, plan_stages, run_pipeline
from affectprep.pipeline.demo import make_demo_dataset, write_dfew_splits

from common import project_for, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from openai_server import OpenAITestServer  # noqa: E402 - the server lives with the tests


def clone_dataset(root: Path, clips: int) -> None:
    """Grow a 7-clip demo dataset to `clips` clips by copying its videos, keeping DFEW's layout."""
    media = root / "Clip" / "original"
    sources = sorted(media.glob("*.mp4"))
    for i in range(len(sources), clips):
        shutil.copy(sources[i % len(sources)], media / f"{i + 1:05d}.mp4")
    write_dfew_splits(root, [(f"{i + 1:05d}", i % 7 + 1, i % 5 + 1) for i in range(clips)])


def vision_rows(project) -> dict[str, list[dict]]:
    index = ensure_index(project, project.datasets["bench"])
    return {p.stage.name: p.store.read(status="ok").to_pylist() for p in plan_stages(project, index, "faces")}


def clone_vision(project, rows: dict[str, list[dict]], clips: int) -> None:
    """Write frames and faces rows for every clip of the grown dataset (a new index key, so new vision keys) by
    copying those of the processed clips."""
    index = ensure_index(project, project.datasets["bench"])
    for plan in plan_stages(project, index, "faces"):
        source = rows[plan.stage.name]
        copies = [{**source[i % len(source)], "sample_id": f"{i + 1:05d}"} for i in range(clips)]
        for start in range(0, len(copies), 200):
            plan.store.write(copies[start:start + 200])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-text-"))
    try:
        root = make_demo_dataset(work / "DFEW", clips=7, seed=0)
        project = project_for(root, work / "run")
        run_pipeline(project, "faces", workers=1, progress=False)
        processed = vision_rows(project)
        clone_dataset(root, args.clips)
        clone_vision(project, processed, args.clips)
        with OpenAITestServer() as server:
            overrides = ['captions.captioner="openai:test-vlm"', f'captions.base_url="{server.base_url}"',
                         'cate.llm="openai:gpt-4o-mini"', f'cate.base_url="{server.base_url}"']
            text = load_project(project.path, overrides)
            t: dict[str, float] = {}
            sent = {}
            for label in ("first run", "rerun, stores intact", "rerun, text stores deleted"):
                if label.endswith("deleted"):
                    for stage in ("captions", "cate"):
                        shutil.rmtree(project.cache / "bench" / stage)
                before = server.request_count
                with timed(label, t):
                    report = run_pipeline(text, workers=2, progress=False)
                sent[label] = server.request_count - before
                done = {s.stage: s.ok for s in report.stages}
                print(f"{label:28} {t[label]:7.2f} s  {sent[label]:5d} requests sent  "
                      f"new captions {done['captions']:5d}  new CATE texts {done['cate']:5d}")
        print(f"{args.clips} clips; targets for the reruns: 0 requests, < 10 s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
