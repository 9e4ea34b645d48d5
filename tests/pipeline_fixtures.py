"""A small demo project in DFEW's layout with one sample of every kind of bad input appended to fold 1."""
from __future__ import annotations

import numpy as np
from pathlib import Path

from affectprep.config import DatasetConfig, ProjectConfig, write_project
from affectprep.pipeline.demo import make_demo_dataset, render_clip, write_video

# sample id -> what is wrong with it, and the error the user should read
BAD = {
    "90001": "corrupt",     # random bytes named .mp4
    "90002": "truncated",   # a real clip cut in half
    "90003": "empty",       # zero bytes
    "90004": "missing",     # named in the annotations, not on disk
    "90006": "no_face",     # a real video with no face in it
}
SHORT = "90005"             # 8 frames: padded to 16, not a failure
UNKNOWN_LABEL = "90007"
OUTSIDE = "../../../outside"


def make_project(tmp: Path, clips: int = 14, stages: dict | None = None) -> ProjectConfig:
    root = make_demo_dataset(tmp / "DFEW", clips=clips, seed=1)
    media = root / "Clip" / "original"
    good = sorted(media.glob("*.mp4"))[0]
    (media / "90001.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes())
    data = good.read_bytes()
    (media / "90002.mp4").write_bytes(data[: len(data) // 2])
    (media / "90003.mp4").write_bytes(b"")
    render_clip("happy", media / f"{SHORT}.mp4", seed=5, num_frames=8)
    write_video(_no_face_frames(), media / "90006.mp4")
    (tmp / "outside.mp4").write_bytes(data)
    rows = [f"{sid},1" for sid in (*BAD, SHORT)] + [f"{UNKNOWN_LABEL},9", f"{OUTSIDE},2"]
    csv = root / "EmoLabel_DataSplit" / "test(single-labeled)" / "set_1.csv"
    with open(csv, "a") as f:
        f.write("\n".join(rows) + "\n")
    project = ProjectConfig(tmp / "affectprep.toml", tmp / "cache", {"demo": DatasetConfig("demo", "dfew", root)},
                            {"faces": {"backend": "haar"}, "captions": {"captioner": "motion"},
                             "cate": {"llm": "template"}, **(stages or {})})
    write_project(project)
    return project


def _no_face_frames(n: int = 20) -> list[np.ndarray]:
    from skimage.data import coffee
    base = coffee()[:240, :320]
    return [np.roll(base, 3 * i, axis=1) for i in range(n)]


def llm_demo_project(tmp: Path, base_url: str, *, clips: int, seed: int) -> ProjectConfig:
    """A clean demo project whose captioner and CATE rewriter are OpenAI-compatible models at `base_url` (a test
    server), with one CATE version rather than one per test fold (these projects are about the LLM round trip)."""
    root = make_demo_dataset(tmp / "DFEW", clips=clips, seed=seed)
    project = ProjectConfig(tmp / "affectprep.toml", tmp / "cache", {"demo": DatasetConfig("demo", "dfew", root)},
                            {"faces": {"backend": "haar"},
                             "captions": {"captioner": "openai:test-vlm", "base_url": base_url},
                             "cate": {"llm": "openai:gpt-4o-mini", "base_url": base_url},
                             "emotions": {"protocol": "pooled"}})
    write_project(project)
    return project
