"""Reading media: video files (decord, falling back to PyAV), folders of frames, and single images.

Every failure is a MediaError whose message a person can act on; the stages record it on the sample.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


class MediaError(Exception):
    """The media cannot be read; the message says why."""


@dataclass(frozen=True)
class MediaInfo:
    num_frames: int
    fps: float
    width: int
    height: int
    decoder: str   # "decord" | "pyav" | "folder" | "image"
    stated_frames: int | None = None   # what the container's header says (frame count, or duration x rate)

    @property
    def truncated(self) -> bool:
        """Fewer frames than the container states: a cut-off download or a damaged file. Durations are rounded
        by muxers, so a couple of frames (or 2%) short is not counted."""
        if not self.stated_frames:
            return False
        return self.num_frames < self.stated_frames - max(2, round(0.02 * self.stated_frames))


def frame_images(folder: Path) -> list[Path]:
    """The images of a frame folder in frame order: by the last integer in the name, so 2.jpg comes before 10.jpg.
    A position in this list is the frame index everywhere in affectprep."""
    def key(path: Path) -> tuple[int, str]:
        digits = re.findall(r"\d+", path.stem)
        return (int(digits[-1]) if digits else -1, path.name)
    with os.scandir(folder) as entries:
        images = [Path(e.path) for e in entries if e.name.lower().endswith(IMAGE_EXTS)]
    return sorted(images, key=key)


def probe(path: Path, kind: str, decoder: str = "auto") -> MediaInfo:
    """Frame count, rate and size, without decoding the clip."""
    if kind == "frames":
        images = _frame_folder(path)
        first = read_image(images[0])
        return MediaInfo(len(images), 0.0, first.shape[1], first.shape[0], "folder")
    if kind == "image":
        image = read_image(_existing_file(path))
        return MediaInfo(1, 0.0, image.shape[1], image.shape[0], "image")
    if kind != "video":
        raise MediaError(f"{kind} media has no frames")
    _existing_file(path)
    # PyAV reads the container headers and counts packets without decoding; it also fails cleanly on garbage,
    # where some decord builds abort the process, so a file that PyAV cannot open never reaches decord.
    import av
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path.name} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            width, height = stream.codec_context.width, stream.codec_context.height
            duration = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                        else float(container.duration) / av.time_base if container.duration else 0.0)
            stated = stream.frames or (round(duration * fps) if duration and fps else None)
            # The packets are what is really there: a header (MKV's duration, MP4's frame count) survives a
            # truncation that removes the frames it counts.
            num = sum(1 for p in container.demux(stream) if p.size)
    except av.FFmpegError as e:
        raise MediaError(f"unreadable video {path.name}: {_ffmpeg_reason(e)}") from None
    if num == 0 or width == 0:
        raise MediaError(f"video {path.name} has no decodable frames")
    return MediaInfo(num, fps, width, height, _video_decoder(decoder), stated)


def read_frames(path: Path, kind: str, indices: Sequence[int], decoder: str = "auto") -> np.ndarray:
    """The frames at `indices` (any order, repeats allowed) as an (N, H, W, 3) uint8 RGB array."""
    if kind == "frames":
        images = _frame_folder(path)
        bad = [i for i in indices if not 0 <= i < len(images)]
        if bad:
            raise MediaError(f"frame {bad[0]} asked for, but {path.name} holds {len(images)} frames")
        return np.stack([read_image(images[i]) for i in indices])
    if kind == "image":
        return np.stack([read_image(_existing_file(path))] * len(indices))
    _existing_file(path)
    if _video_decoder(decoder) == "decord":
        try:
            return _read_decord(path, indices)
        except MediaError:
            if decoder == "decord":
                raise
        # decord stumbles on some files (odd containers, broken indexes) that PyAV reads in order.
    return _read_pyav(path, indices)


def read_image(path: Path) -> np.ndarray:
    data = np.fromfile(path, np.uint8) if path.is_file() else None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if image is None:
        raise MediaError(f"unreadable image {path.name}" if path.exists() else f"image {path} not found")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _read_decord(path: Path, indices: Sequence[int]) -> np.ndarray:
    import decord
    try:
        # One thread: the DAG already runs one worker process per core. A tiny fault_tol makes decord raise instead
        # of silently handing back a neighbouring frame for one it could not decode; "auto" then retries with
        # PyAV, which names the frame.
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, fault_tol=1e-9)
        if max(indices) >= len(reader):
            raise MediaError(f"frame {max(indices)} asked for, but {path.name} holds {len(reader)} frames")
        return reader.get_batch(list(indices)).asnumpy()
    except (decord.DECORDError, decord.DECORDLimitReachedError, RuntimeError) as e:
        raise MediaError(f"decord cannot read {path.name}: {str(e).splitlines()[0][:200]}") from None


def _read_pyav(path: Path, indices: Sequence[int]) -> np.ndarray:
    import av
    wanted = set(indices)
    last = max(indices)
    found: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            # Decoding in order and stopping after the last wanted frame: seeking by timestamp lands on keyframes
            # and is unreliable across containers, so the frame index would not be exact.
            for frame in container.decode(stream):
                if decoded in wanted:
                    found[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
                if decoded > last:
                    break
    except av.FFmpegError as e:
        if not found:
            raise MediaError(f"unreadable video {path.name}: {_ffmpeg_reason(e)}") from None
    if len(found) < len(wanted):
        missing = min(wanted - set(found))
        raise MediaError(f"truncated or damaged video {path.name}: frame {missing} asked for, only {decoded} "
                         f"frames decodable")
    return np.stack([found[i] for i in indices])


def _video_decoder(decoder: str) -> str:
    if decoder not in ("auto", "decord", "pyav"):
        raise MediaError(f"unknown decoder {decoder!r}")
    if decoder == "auto":
        try:
            import decord  # noqa: F401
        except ImportError:
            return "pyav"
        return "decord"
    return decoder


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise MediaError(f"{path} not found")
    if not path.is_file():
        raise MediaError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path.name} is empty (0 bytes)")
    return path


def _frame_folder(path: Path) -> list[Path]:
    if not path.is_dir():
        raise MediaError(f"frame folder {path} not found")
    images = frame_images(path)
    if not images:
        raise MediaError(f"frame folder {path.name} holds no images")
    return images


def _ffmpeg_reason(error: Exception) -> str:
    return str(getattr(error, "strerror", None) or error).splitlines()[0][:200]
