"""Training throughput of GRACE at real size: end to end from frames against heads only from cached features.

Real size: a randomly initialised VideoMAE-base (16 frames of 224 px, tubelets of 2, width 768, 12 layers: GRACE's
BASE_VIDEO) and a randomly initialised BERT-base text encoder (pooler included, as in bert-base-uncased) with the
offline tiny tokenizer (its ids lie inside BERT-base's vocabulary), both saved with save_pretrained and loaded by
path, as real checkpoints are. Torch runs on --threads threads (default: torch's, one per core) in every timed
part; on a shared machine other processes' load falls on the figures, so the ratio is the one to read.

1. The demo project (Haar faces, motion captioner, template CATE) goes through the pipeline.
2. `train --from frames`: one epoch of GRACE fine-tuning VideoMAE (the text encoder is frozen, as by default).
3. The `features` and `text_features` stages cache the frozen encoders' tokens for every clip (train and test):
   the one-off cost, timed per stage; both run in this process, on the same threads as training.
4. `train --from features`: one epoch over the same training samples, same batch size; only the heads learn.

Samples/s is the trainer's own `samples_per_s` (metrics.json): the training loop alone, without model building,
the end-of-run evaluation or the checkpoint. Break-even = caching time / training time saved per epoch; evaluation
from features is cheaper too, so the true break-even comes no later. Figures only, nothing is asserted.
Usage: python bench/bench_train_throughput.py [--clips 14] [--batch-size 2] [--threads N] [--workers 0]
"""
from __future__ import annotations

import argparse
import math
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, VideoMAEConfig, VideoMAEModel
from transformers.utils import logging as transformers_logging

from affectprep.config import DatasetConfig, ProjectConfig, load_project, write_project
from affectprep.models.grace import BASE_VIDEO
from affectprep.models.runs import RunFolder, TrainConfig
from affectprep.models.text import tiny_tokenizer
from affectprep.models.train import train
from affectprep.pipeline.dag import run_pipeline
from affectprep.pipeline.demo import make_demo_dataset
from affectprep.train_sources import resolve_sources

from common import timed

TEXT_LENGTH = 256   # the text_features stage's default truncation; the end-to-end model gets the same


def save_encoders(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    video, text = folder / "videomae-base", folder / "bert-base"
    VideoMAEModel(VideoMAEConfig(**BASE_VIDEO)).save_pretrained(video)
    BertModel(BertConfig()).save_pretrained(text)
    tiny_tokenizer().save_pretrained(text)
    return video, text


def demo_project(work: Path, clips: int) -> ProjectConfig:
    root = make_demo_dataset(work / "DFEW", clips=clips, seed=0)
    project = ProjectConfig(work / "affectprep.toml", work / "cache", {"bench": DatasetConfig("bench", "dfew", root)},
                            {"faces": {"backend": "haar"}, "captions": {"captioner": "motion"},
                             "cate": {"llm": "template"}})
    write_project(project)
    return project


def run_stage(project: ProjectConfig, stage: str | None = None, **options) -> None:
    report = run_pipeline(project, stage, progress=False, **options)
    if report.failed:
        raise SystemExit(f"{report.failed} samples failed in the pipeline ({stage or 'every stage'})")


def one_epoch(config: TrainConfig, sources, runs: Path, seconds: dict, label: str) -> tuple[dict, str]:
    """Train one epoch: its metrics.json entry and the trainer's description of the run; the whole call's wall
    time goes under `label` in `seconds`."""
    said: list[str] = []
    with timed(label, seconds):
        run = train(config, {"expression": sources}, runs, echo=said.append)
    return RunFolder(run).read_json("metrics.json")[0], said[0].split(": ", 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=14, help="demo clips; DFEW fold 1 tests about a fifth")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        seconds: dict[str, float] = {}
        video, text = save_encoders(work / "encoders")
        project = demo_project(work / "project", args.clips)
        with timed("pipeline", seconds):
            run_stage(project)
        common = dict(model_name="grace", fold=1, epochs=1, batch_size=args.batch_size, num_workers=args.workers,
                      eval_every=1_000)
        end_to_end = TrainConfig(**common, model={"pretrained": str(video), "text_encoder": str(text),
                                                  "max_text_length": TEXT_LENGTH})
        frames, described = one_epoch(end_to_end, resolve_sources(project, "bench"), work / "runs", seconds,
                                      "train from frames")

        cached = load_project(project.path)
        cached.stages["features"] = {"video_encoder": str(video), "device": device}
        cached.stages["text_features"] = {"text_encoder": str(text), "device": device, "max_length": TEXT_LENGTH}
        for stage in ("features", "text_features"):
            with timed(stage, seconds):
                run_stage(cached, stage, scheduler="inline")
        heads_only = TrainConfig(**common, source="features", model={"pretrained": str(video)})
        features, _ = one_epoch(heads_only, resolve_sources(cached, "bench", features=True), work / "runs", seconds,
                                "train from features")

        caching = seconds["features"] + seconds["text_features"]
        # Both epochs train on the same samples in the same batches, so their loop times compare directly. The
        # trainer's samples_per_s is rounded to 0.01, too coarse for the end-to-end figure: divide its own count.
        samples = int(re.search(r"(\d+) training samples", described)[1])
        epochs = caching / (frames["seconds"] - features["seconds"])
        print(f"GRACE real size (VideoMAE-base 16x224 px, BERT-base text, random init), torch {torch.__version__}, "
              f"{args.threads} threads, {args.workers} loader workers, batch {args.batch_size}, {args.clips} demo "
              f"clips; the trainer: {described}")
        print(f"  pipeline (frames, faces, captions, CATE): {seconds['pipeline']:.1f} s (not counted below)")
        for name, entry in (("from frames", frames), ("from features", features)):
            print(f"  train {name:14}: {samples / entry['seconds']:8.4f} samples/s  (loop {entry['seconds']:.2f} s; "
                  f"whole call with model build, eval, checkpoint {seconds[f'train {name}']:.1f} s)")
        print(f"  features / frames   : {frames['seconds'] / features['seconds']:8.1f}x")
        print(f"  one-off caching     : {caching:8.1f} s  (features {seconds['features']:.1f} s + text_features "
              f"{seconds['text_features']:.1f} s, all {args.clips} clips, encoders loaded once)")
        print(f"  break-even          : {epochs:8.2f} epochs (caching has paid for itself by the end of epoch "
              f"{math.ceil(epochs)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
