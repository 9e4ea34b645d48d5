"""`frames`: open each clip and choose which source frames it contributes (16 per view)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..media import MediaError, probe
from ..sampling import sample_indices
from ..stage import SampleError, Stage


@dataclass(frozen=True)
class FramesConfig:
    num_frames: int = 16
    method: Literal["uniform", "stride", "segment"] = "uniform"   # segment = DFER-CLIP/TSN, stride = MAE-DFER
    stride: int = 4                                                # only for method = "stride"
    views: int = 1                                                 # temporal views for multi-view testing
    decoder: Literal["auto", "decord", "pyav"] = "auto"
    truncated: Literal["flag", "fail"] = "flag"                   # a video shorter than its container states

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.views < 1 or self.stride < 1:
            raise ValueError(f"num_frames, views and stride must be at least 1, got num_frames={self.num_frames}, "
                             f"views={self.views}, stride={self.stride}")


class FramesStage(Stage):
    name = "frames"
    version = 1
    Config = FramesConfig
    reads = {"index": ("media_path", "media_kind", "frame_start", "frame_end")}
    media_kinds = frozenset({"video", "frames", "image"})

    def process_one(self, row: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        try:
            info = probe(Path(row["media_path"]), row["media_kind"], decoder=c.decoder)
        except MediaError as e:
            raise SampleError(str(e)) from None
        if row["media_kind"] == "image":  # a still image is one aligned frame, not a padded clip
            views, padded, per_view = [[0]], False, 1
        else:
            end = row["frame_end"] if row["frame_end"] is not None else -1
            try:
                views, padded = sample_indices(info.num_frames, method=c.method, num_frames=c.num_frames,
                                               stride=c.stride, views=c.views, start=row["frame_start"] or 0,
                                               end=end)
            except ValueError as e:
                raise SampleError(str(e)) from None
            per_view = c.num_frames
        warning = None
        if info.truncated:
            message = (f"truncated or damaged video: {info.num_frames} of the {info.stated_frames} frames its "
                       f"container states are there")
            if c.truncated == "fail":
                raise SampleError(message)
            warning = message + "; sampled from what is there (frames.truncated = \"fail\" fails it instead)"
        return {
            "warning": warning,
            "frame_indices": [i for view in views for i in view],
            "num_views": len(views),
            "frames_per_view": per_view,
            "num_source_frames": info.num_frames,
            "fps": info.fps,
            "width": info.width,
            "height": info.height,
            "padded": padded,
            "decoder": info.decoder,
        }
