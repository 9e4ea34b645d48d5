"""`faces` throughput on demo clips.

1. The pipeline: affectprep's `faces` stage (Haar) with 1 and 2 workers against the loop a paper repository
   typically ships: decode every frame with OpenCV, run the face detector on every full frame, crop the largest
   face, resize, write one JPEG file per frame. Target: affectprep >= 3x the loop.
2. Per backend, on the same 16 sampled frames of each clip (decoding excluded, one process): our detection,
   tracking, landmarks and alignment (`align_clip`) against the naive per-frame loop of the same backend (a full
   detection of every frame, landmarks of its largest face, one frame at a time). For FAN the naive loop is
   face-alignment's own batch API (`get_landmarks_from_batch`, which loops over the images) on the same boxes. On a
   GPU our FAN path passes 16 frames at a time, and the ratio is what that batching buys; on a CPU both pass one
   frame at a time (a batch was measured 1.3x slower on one core), so the ratio is ~1. FAN runs with randomly initialised weights saved
   under face-alignment's file names (its real weights cannot be downloaded here): the timing is real, the
   landmarks are not.
Usage: python bench/bench_faces.py [--clips N] [--backend-clips N] [--skip-pipeline]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from affectprep.pipeline.backends.face import align_clip, dlib_installed, load_face_backend
from affectprep.pipeline.dag import run_pipeline
from affectprep.pipeline.demo import make_demo_dataset
from affectprep.pipeline.media import read_frames
from affectprep.pipeline.sampling import sample_indices

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


def largest(boxes: np.ndarray) -> np.ndarray | None:
    if len(boxes) == 0:
        return None
    return boxes[int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))]


def naive_haar(backend, frames: np.ndarray) -> None:
    for frame in frames:
        box = largest(backend.find_faces(frame)[0])
        if box is not None:
            backend.fit_shape(frame, box)


def naive_dlib(backend, frames: np.ndarray) -> None:
    for frame in frames:
        box = largest(backend.find_faces(frame)[0])
        if box is not None:
            backend.landmarks(frame, box)


def fan_pair(torch_home: Path):
    """Our FAN backend on Haar boxes and face-alignment's batch API on the same boxes, random FAN weights."""
    import torch
    from face_alignment.models import FAN

    from affectprep.pipeline.backends import face_fan

    checkpoints = face_fan.hub_checkpoints(torch_home)
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), checkpoints / face_fan.FAN_WEIGHTS_FILE)
    os.environ["TORCH_HOME"] = str(torch_home)
    backend = load_face_backend("fan", detector="haar")

    def naive(frames: np.ndarray) -> None:
        faces = backend._haar_faces(frames)  # the same boxes as ours, found the same way
        images = torch.from_numpy(frames).permute(0, 3, 1, 2)
        boxes = [[face[1].astype(np.float64)] if face is not None else [] for face in faces]
        backend._aligner.get_landmarks_from_batch(images, detected_faces=boxes)
    return backend, naive


def sampled_frames(clips: list[Path]) -> list[np.ndarray]:
    """The 16 frames the frames stage samples from each clip (uniform, fixed stride), decoded once up front."""
    out = []
    for clip in clips:
        count = int(cv2.VideoCapture(str(clip)).get(cv2.CAP_PROP_FRAME_COUNT))
        (view,), _ = sample_indices(count, num_frames=16)
        out.append(read_frames(clip, "video", sorted(set(view))))
    return out


def per_backend(clips: list[Path], work: Path, fan_clips: int) -> None:
    frames = sampled_frames(clips)
    backends = {"haar": (load_face_backend("haar"), naive_haar)}
    if dlib_installed():
        backends["dlib (hog)"] = (load_face_backend("dlib"), naive_dlib)
    else:
        print("  dlib: not installed (pip install 'affectprep[dlib]'); skipped")
    try:
        fan, fan_naive = fan_pair(work / "torch_home")
        backends["fan (haar boxes)"] = (fan, lambda _, clip: fan_naive(clip))
    except ImportError:
        print("  fan: face-alignment not installed (pip install 'affectprep[face]'); skipped")
    print("per backend, 16 sampled frames a clip, one process, decoding excluded:")
    print(f"  {'backend':18} {'affectprep':>14} {'naive loop':>14}  speed-up")
    for label, (backend, naive_loop_of) in backends.items():
        some = frames[:fan_clips] if label.startswith("fan") else frames  # FAN-4 takes ~1 s a frame on one core
        start = time.perf_counter()
        for clip in some:
            align_clip(clip, backend)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        for clip in some:
            naive_loop_of(backend, clip)
        naive = time.perf_counter() - start
        print(f"  {label:18} {len(some) / ours:9.2f} clip/s {len(some) / naive:9.2f} clip/s  {naive / ours:6.2f}x"
              f"  ({len(some)} clips)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=56)
    parser.add_argument("--backend-clips", type=int, default=14, help="clips for the per-backend comparison")
    parser.add_argument("--fan-clips", type=int, default=3, help="clips for FAN (slow on a CPU)")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the per-backend comparison")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-faces-"))
    try:
        root = make_demo_dataset(work / "DFEW", clips=max(args.clips, args.backend_clips), seed=0)
        all_clips = sorted((root / "Clip" / "original").glob("*.mp4"))
        if not args.skip_pipeline:
            pipeline(all_clips[:args.clips], root, work)
        per_backend(all_clips[:args.backend_clips], work, args.fan_clips)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pipeline(clips: list[Path], root: Path, work: Path) -> None:
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


if __name__ == "__main__":
    main()
