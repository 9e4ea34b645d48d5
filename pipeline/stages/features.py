"""`features`, `text_features` and `audio_features`: frozen backbone outputs cached for `train --from features`,
which then trains only the heads. `features` runs VideoMAE (patch tokens) and/or CLIP (one embedding per frame) on
the aligned clips; `text_features` runs a text encoder over the CATE texts of the current text version (a separate
stage, so a new text version re-embeds text and never touches the expensive vision features); `audio_features`
runs a speech encoder (Wav2Vec2) on each utterance and a text encoder (BERT) on its transcript (MGCMA).

All three are optional: with no backbone configured they are left out of a run (naming one with --stage is an error
that says what to set). Each checkpoint's identity (folder name + weights hash, or hub commit) is in the key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from affectprep.speech import MAX_TRANSCRIPT_TOKENS, MAX_UTTERANCE_SECONDS, normalizes_waveform

from ..backends.checkpoints import checkpoint_identity
from ..stage import SampleError, Stage, failed_row
from .text_backends import decode_crops


@dataclass(frozen=True)
class FeaturesConfig:
    video_encoder: str | None = None   # VideoMAE checkpoint (folder or cached hub id): patch tokens
    clip_encoder: str | None = None    # CLIP checkpoint: per-frame image embeddings
    views: str = "all"                 # "all" (multi-view testing from features) | "first"
    device: str = "cpu"


@dataclass(frozen=True)
class AudioFeaturesConfig:
    """Utterances are cut at affectprep.speech.MAX_UTTERANCE_SECONDS, as the fine-tuning path cuts them (not an
    option: the two paths must agree)."""
    speech_encoder: str | None = None  # e.g. facebook/wav2vec2-base
    text_encoder: str | None = None    # e.g. bert-base-uncased, for the transcripts
    max_length: int = MAX_TRANSCRIPT_TOKENS
    device: str = "cpu"


@dataclass(frozen=True)
class TextFeaturesConfig:
    text_encoder: str | None = None    # e.g. bert-base-uncased, GRACE's text encoder
    max_length: int = 256
    device: str = "cpu"


class FeaturesStage(Stage):
    name = "features"
    version = 1
    Config = FeaturesConfig
    reads = {"faces": ("crops", "num_views", "frames_per_view")}
    media_kinds = frozenset({"video", "frames", "image"})
    batch_size = 8

    def __init__(self, config: FeaturesConfig):
        super().__init__(config)
        if config.views not in ("all", "first"):
            raise ValueError(f"views must be 'all' or 'first', got {config.views!r}")
        if config.video_encoder:   # VideoMAE encodes clips: still images are not its input
            self.media_kinds = frozenset({"video", "frames"})

    def skip_note(self, media_kinds: set[str]) -> str | None:
        if "image" in media_kinds and "image" not in self.media_kinds:
            return ("VideoMAE (video_encoder) encodes clips, so still images are left out; for an image dataset "
                    "set datasets.NAME.stages.features.video_encoder = \"\" and a clip_encoder")
        return None

    def enabled(self) -> bool:
        return bool(self.config.video_encoder or self.config.clip_encoder)

    def disabled_reason(self) -> str:
        return "set stages.features.video_encoder and/or stages.features.clip_encoder"

    def identity(self) -> dict[str, Any]:
        c = self.config
        return {"video_encoder": c.video_encoder and checkpoint_identity(c.video_encoder),
                "clip_encoder": c.clip_encoder and checkpoint_identity(c.clip_encoder)}

    def setup(self) -> None:
        from ..backends.feature_encoders import ClipFrameEmbeddings, VideoMAETokens
        c = self.config
        self.video = VideoMAETokens(c.video_encoder, c.device) if c.video_encoder else None
        self.clip = ClipFrameEmbeddings(c.clip_encoder, c.device) if c.clip_encoder else None
        self.encoders = json.dumps({"video_encoder": c.video_encoder, "clip_encoder": c.clip_encoder})

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Decode every clip, then encode the batch's clips together; a sample that fails alone fails alone."""
        clips, out = [], {}
        for row in rows:
            try:
                clips.append((row, self._views(row)))
            except Exception as e:  # noqa: BLE001 - recorded on the sample
                out[row["sample_id"]] = failed_row(row["sample_id"], f"cannot decode the aligned crops: {e}")
        if clips:
            try:
                out.update(self._encode(clips))
            except Exception as e:  # noqa: BLE001 - a model error is recorded on the samples of this batch
                out.update({row["sample_id"]: failed_row(row["sample_id"], f"feature encoder failed: "
                                                         f"{type(e).__name__}: {e}") for row, _ in clips})
        return [out[row["sample_id"]] for row in rows]

    def _views(self, row: dict[str, Any]) -> list[np.ndarray]:
        per_view, views = row["frames_per_view"], 1 if self.config.views == "first" else row["num_views"]
        return [decode_crops(row["crops"][v * per_view:(v + 1) * per_view]) for v in range(views)]

    def _encode(self, clips: list[tuple[dict, list[np.ndarray]]]) -> dict[str, dict[str, Any]]:
        from ..backends.feature_encoders import array_bytes
        flat = [view for _, views in clips for view in views]
        encoded = {"visual": self.video.encode(flat) if self.video else None,
                   "frame": self.clip.encode(flat) if self.clip else None}
        out, start = {}, 0
        for row, views in clips:
            result = {"sample_id": row["sample_id"], "status": "ok", "error": None, "encoders": self.encoders}
            for name, arrays in encoded.items():
                data, shape = (array_bytes(np.stack(arrays[start:start + len(views)])) if arrays is not None
                               else (None, None))
                result[f"{name}_tokens" if name == "visual" else "frame_features"] = data
                result[f"{name}_shape"] = shape
            out[row["sample_id"]] = result
            start += len(views)
        return out


class TextFeaturesStage(Stage):
    name = "text_features"
    version = 1
    Config = TextFeaturesConfig
    reads = {"cate": ("text",)}
    media_kinds = frozenset({"video", "frames", "image"})
    needs_label = True
    batch_size = 32

    def enabled(self) -> bool:
        return bool(self.config.text_encoder)

    def disabled_reason(self) -> str:
        return "set stages.text_features.text_encoder"

    def identity(self) -> dict[str, Any]:
        return {"text_encoder": self.config.text_encoder and checkpoint_identity(self.config.text_encoder)}

    def setup(self) -> None:
        from ..backends.feature_encoders import TextTokens
        c = self.config
        self.encoder = TextTokens(c.text_encoder, c.device, c.max_length)

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from ..backends.feature_encoders import array_bytes
        try:
            tokens = self.encoder.encode([row["text"] for row in rows])
        except Exception as e:  # noqa: BLE001 - a model error is recorded on the samples of this batch
            return [failed_row(row["sample_id"], f"text encoder failed: {type(e).__name__}: {e}") for row in rows]
        out = []
        for row, array in zip(rows, tokens):
            data, shape = array_bytes(array)
            out.append({"sample_id": row["sample_id"], "status": "ok", "error": None, "text_tokens": data,
                        "text_shape": shape, "text": row["text"], "encoder": self.config.text_encoder})
        return out


class AudioFeaturesStage(Stage):
    name = "audio_features"
    version = 1
    Config = AudioFeaturesConfig
    reads = {"audio": ("waveform", "transcript")}
    media_kinds = frozenset({"audio"})
    batch_size = 8

    def enabled(self) -> bool:
        return bool(self.config.speech_encoder and self.config.text_encoder)

    def disabled_reason(self) -> str:
        return "set stages.audio_features.speech_encoder and stages.audio_features.text_encoder"

    def identity(self) -> dict[str, Any]:
        return {"speech_encoder": checkpoint_identity(self.config.speech_encoder),
                "text_encoder": checkpoint_identity(self.config.text_encoder),
                # What the encoder is fed: both change every cached frame.
                "normalize": normalizes_waveform(self.config.speech_encoder), "max_seconds": MAX_UTTERANCE_SECONDS}

    def setup(self) -> None:
        from ..backends.feature_encoders import SpeechTokens, TextTokens
        c = self.config
        self.speech = SpeechTokens(c.speech_encoder, c.device)
        self.text = TextTokens(c.text_encoder, c.device, c.max_length)
        self.encoders = json.dumps({"speech_encoder": c.speech_encoder, "text_encoder": c.text_encoder})

    def process_one(self, row: dict[str, Any]) -> dict[str, Any]:
        """One utterance at a time (the speech encoder takes them singly anyway): a bad one fails alone."""
        from ..backends.feature_encoders import array_bytes
        waveform = np.frombuffer(row["waveform"] or b"", dtype="<i2").astype(np.float32) / 32768.0
        if waveform.size == 0:
            raise SampleError("the audio store holds no samples for this utterance")
        (audio, audio_shape), = map(array_bytes, self.speech.encode([waveform]))
        (words, text_shape), = map(array_bytes, self.text.encode([row["transcript"] or ""]))
        return {"audio_tokens": audio, "audio_shape": audio_shape, "text_tokens": words, "text_shape": text_shape,
                "encoders": self.encoders}
