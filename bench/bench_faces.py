"""`faces` throughput on demo clips: affectprep with 1 and 2 workers against a naive reference loop.

The naive loop is what a paper repository typically ships: decode every frame with OpenCV, run the face detector on
every full frame, crop the largest face, resize, write one JPEG file per frame. Target: affectprep >= 3x the loop.
Usage: python bench/bench_faces.py [--clips N]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import cv2

from affectprep.pipeline.dag import run_pipeline
from affectprep.pipeline.demo import make_demo_dataset

from common import project_for, timed


def naive_loop(clips: list[Path], out: Path) -> None:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    for clip in clips:
        cap = cv2.VideoCapture(str(clip))
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            faces = cascade.detectMultiScale(gray, 1.1, 4)
            if len(faces):
                x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
                crop = cv2.resize(frame[y:y + h, x:x + w], (224, 224))
                cv2.imwrite(str(out / f"{clip.stem}_{i:05d}.jpg"), crop)
            i += 1
        cap.release()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=56)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-faces-"))
    try:
        root = make_demo_dataset(work / "DFEW", clips=args.clips, seed=0)
        clips = sorted((root / "Clip" / "original").glob("*.mp4"))
        frames = sum(int(cv2.VideoCapture(str(c)).get(cv2.CAP_PROP_FRAME_COUNT)) for c in clips)
        t: dict[str, float] = {}
        (work / "naive").mkdir()
        with timed("naive loop", t):
            naive_loop(clips, work / "naive")
        for workers in (1, 2):
            project = project_for(root, work / f"w{workers}")
            with timed(f"affectprep, {workers} worker(s)", t):
                run_pipeline(project, "faces", workers=workers, progress=False)
        print(f"{len(clips)} demo clips, {frames} frames in all, {frames / len(clips):.0f} per clip")
        for label, seconds in t.items():
            print(f"  {label:26} {seconds:7.2f} s  {len(clips) / seconds:7.2f} clips/s")
        naive = t["naive loop"]
        one, two = t["affectprep, 1 worker(s)"], t["affectprep, 2 worker(s)"]
        print(f"  speed-up vs naive loop: {naive / one:.1f}x with 1 worker, {naive / two:.1f}x with 2 workers "
              f"(target >= 3x)")
        print(f"  2 workers vs 1 worker: {one / two:.2f}x (cluster start-up included in both)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
