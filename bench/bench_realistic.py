"""`frames` + `faces` on realistic clips: about 3 s at 25 fps, 640x360, the face a fraction of the frame.

Reports clips/s per core (one worker) and projects the wall time for DFEW + FERV39k + MAFW (about 65,000 clips)
on a 16-core machine. Usage: python bench/bench_realistic.py [--clips N]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from affectprep.pipeline.dag import run_pipeline
from affectprep.pipeline.demo import render_clip, write_dfew_splits

from common import project_for, timed

CLASSES = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
DATASET_CLIPS = 65_000
CORES = 16


def make_dataset(root: Path, clips: int) -> Path:
    media = root / "Clip" / "original"
    media.mkdir(parents=True)
    for i in range(clips):
        render_clip(CLASSES[i % 7], media / f"{i + 1:05d}.mp4", seed=i, num_frames=75, size=(640, 360))
    write_dfew_splits(root, [(f"{i + 1:05d}", i % 7 + 1, i % 5 + 1) for i in range(clips)])
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-realistic-"))
    try:
        root = make_dataset(work / "DFEW", args.clips)
        t: dict[str, float] = {}
        project = project_for(root, work / "run")
        with timed("frames+faces", t):
            report = run_pipeline(project, "faces", workers=1, progress=False)
        ok = report.stages[-1].ok
        rate = args.clips / t["frames+faces"]
        print(f"{args.clips} clips of 75 frames at 640x360 ({ok} aligned), 1 worker: {t['frames+faces']:.1f} s")
        print(f"  {rate:.2f} clips/s per core (frames + faces, cluster start-up included)")
        hours = DATASET_CLIPS / (rate * CORES) / 3600
        print(f"  projected for {DATASET_CLIPS:,} clips on {CORES} cores: {hours:.2f} h")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
