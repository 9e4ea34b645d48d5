"""`audio`: each utterance as 16 kHz mono 16-bit PCM, with its transcript (IEMOCAP, or any dataset's audio samples).

Decoding: a WAV goes through the standard library's `wave` (IEMOCAP ships 16-bit PCM; 8, 24 and 32-bit PCM read the
same way), which insists on a RIFF header, so random bytes fail instead of being decoded as noise. What `wave` cannot
read (float or compressed WAV, FLAC) goes through PyAV, with the container format fixed by the extension for the
same reason. Channels are averaged to mono. A WAV whose header promises more samples than the file holds is
damaged, not short: it fails rather than being stored cut.

Resampling: scipy.signal.resample_poly, a polyphase FIR (Kaiser window) at the exact rational ratio 16000 / rate, so
a 16 kHz file passes through sample for sample and an 8 kHz one gains no images above its 4 kHz band. Samples are
scaled by 2^15 both ways, so 16-bit 16 kHz input is stored bit-exact.

Failures, each a failed row with the reason (never a crash): missing or empty file, unreadable or damaged audio, no
samples, and no transcript while `require_transcript` (MGCMA needs the text; set it False for audio-only data).
"""
from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..media import MediaError
from ..stage import SampleError, Stage

SAMPLE_RATE = 16000
_CONTAINERS = {".wav": "wav", ".flac": "flac"}


@dataclass(frozen=True)
class AudioConfig:
    require_transcript: bool = True


class AudioStage(Stage):
    name = "audio"
    version = 1
    Config = AudioConfig
    reads = {"index": ("media_path", "transcript")}
    media_kinds = frozenset({"audio"})
    batch_size = 32     # decoding an utterance takes milliseconds; bigger tasks keep Dask's overhead small

    def process_one(self, row: dict[str, Any]) -> dict[str, Any]:
        transcript = (row["transcript"] or "").strip() or None
        if transcript is None and self.config.require_transcript:
            raise SampleError("no transcript for this utterance (IEMOCAP: no line for it in its dialog's "
                              "transcriptions file); audio.require_transcript = false accepts audio without text")
        try:
            samples, rate = read_audio(Path(row["media_path"]))
        except MediaError as e:
            raise SampleError(str(e)) from None
        pcm = to_pcm16(resample(samples, rate))
        return {"waveform": pcm.tobytes(), "sample_rate": SAMPLE_RATE, "num_samples": len(pcm),
                "transcript": transcript}


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sample rate) of an audio file; MediaError says why it cannot be read."""
    if not path.is_file():
        raise MediaError(f"{path} not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path.name} is empty (0 bytes)")
    samples, rate = None, 0
    if path.suffix.lower() == ".wav":
        samples, rate = _read_pcm_wav(path)
    if samples is None:
        samples, rate = _read_pyav(path)
    if samples.size == 0:
        raise MediaError(f"{path.name} holds no audio samples")
    return samples, rate


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return samples
    common = math.gcd(SAMPLE_RATE, rate)
    from scipy.signal import resample_poly   # here: scipy.signal costs a second to import, for every command

    return resample_poly(samples, SAMPLE_RATE // common, rate // common).astype(np.float32)


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2")


def _read_pcm_wav(path: Path) -> tuple[np.ndarray | None, int]:
    """An integer-PCM WAV; (None, 0) for a WAV in another encoding, which PyAV reads."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, promised = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            data = w.readframes(promised)
    except wave.Error as e:
        if str(e).startswith("unknown format"):
            return None, 0
        raise MediaError(f"unreadable WAV {path.name}: {e}") from None
    except EOFError:
        raise MediaError(f"unreadable WAV {path.name}: the header is cut short") from None
    held = len(data) // (channels * width)
    if held < promised:
        raise MediaError(f"truncated WAV {path.name}: the header promises {promised} samples, the file holds {held}")
    return _pcm_to_float(data, width).reshape(-1, channels).mean(axis=1), rate


def _pcm_to_float(data: bytes, width: int) -> np.ndarray:
    if width == 1:      # 8-bit WAV is unsigned
        return (np.frombuffer(data, np.uint8).astype(np.float32) - 128) / 128
    if width == 3:      # no 24-bit dtype: widen each sample to 32 bits, its 3 bytes as the high ones
        wide = np.zeros((len(data) // 3, 4), np.uint8)
        wide[:, 1:] = np.frombuffer(data, np.uint8).reshape(-1, 3)
        data, width = wide.tobytes(), 4
    return np.frombuffer(data, f"<i{width}").astype(np.float32) / 2 ** (8 * width - 1)


def _read_pyav(path: Path) -> tuple[np.ndarray, int]:
    import av
    try:
        with av.open(str(path), format=_CONTAINERS.get(path.suffix.lower())) as container:
            if not container.streams.audio:
                raise MediaError(f"{path.name} has no audio stream")
            stream = container.streams.audio[0]
            # Planar float keeps the channels apart, so they are averaged exactly as the WAV path does.
            planar = av.AudioResampler(format="fltp")
            chunks = [out.to_ndarray() for frame in container.decode(stream) for out in planar.resample(frame)]
            rate = stream.codec_context.sample_rate
    except av.FFmpegError as e:
        reason = str(getattr(e, "strerror", None) or e).splitlines()[0][:200]
        raise MediaError(f"unreadable audio {path.name}: {reason}") from None
    if not chunks:
        raise MediaError(f"no decodable audio in {path.name}")
    return np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32), rate
