"""Frozen backbones for the `features`, `text_features` and `audio_features` stages: VideoMAE patch tokens, CLIP
frame embeddings, text encoder token embeddings, speech encoder frames. Each loads a local folder or a cached hub id with `from_pretrained`,
runs in eval mode without gradients, and returns float16 arrays (what the store keeps).

Frames are prepared as the trainer prepares them (models/data.py ClipAugment in eval mode): resized to the
encoder's image size with area interpolation, scaled to [0, 1], normalised by the encoder's mean and std, so a
head trained on cached tokens sees what it would see end to end.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from affectprep.speech import MAX_UTTERANCE_SECONDS, SAMPLE_RATE, normalize_waveform, normalizes_waveform

# The statistics each backbone was pre-trained with (VideoMAE: ImageNet; CLIP: its own).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _normalised(frames: np.ndarray, size: int, mean: tuple, std: tuple) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3, size, size) float32."""
    resized = np.stack([f if f.shape[:2] == (size, size) else
                        cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA if f.shape[0] > size
                                   else cv2.INTER_LINEAR) for f in frames])
    out = (resized.astype(np.float32) / 255 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


class _Encoder:
    def __init__(self, name: str, device: str):
        import torch

        self.torch = torch
        self.name, self.device = name, device

    def _run(self, model: Any, **inputs: Any) -> Any:
        with self.torch.inference_mode():
            return model(**{k: v.to(self.device) for k, v in inputs.items()})


class VideoMAETokens(_Encoder):
    """VideoMAE encoder -> patch tokens (T', H'*W', D) per clip of exactly `num_frames` frames."""

    def __init__(self, name: str, device: str = "cpu"):
        super().__init__(name, device)
        from transformers import VideoMAEModel

        self.model = VideoMAEModel.from_pretrained(name).to(device).eval()
        config = self.model.config
        self.num_frames, self.size = config.num_frames, config.image_size
        self.grid = (config.num_frames // config.tubelet_size, (config.image_size // config.patch_size) ** 2)

    def encode(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        for clip in clips:
            if len(clip) != self.num_frames:
                raise ValueError(f"{self.name} takes clips of {self.num_frames} frames, got {len(clip)}: set "
                                 f"frames.num_frames to {self.num_frames}")
        pixels = self.torch.from_numpy(np.stack([_normalised(c, self.size, IMAGENET_MEAN, IMAGENET_STD)
                                                 for c in clips]))
        tokens = self._run(self.model, pixel_values=pixels).last_hidden_state
        return list(tokens.reshape(len(clips), *self.grid, -1).float().cpu().numpy().astype(np.float16))


class ClipFrameEmbeddings(_Encoder):
    """CLIP vision tower + projection -> one embedding per frame (T, D)."""

    def __init__(self, name: str, device: str = "cpu"):
        super().__init__(name, device)
        from transformers import CLIPVisionModelWithProjection

        self.model = CLIPVisionModelWithProjection.from_pretrained(name).to(device).eval()
        self.size = self.model.config.image_size

    def encode(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        lengths = [len(c) for c in clips]
        pixels = self.torch.from_numpy(_normalised(np.concatenate(clips), self.size, CLIP_MEAN, CLIP_STD))
        embeds = self._run(self.model, pixel_values=pixels).image_embeds.float().cpu().numpy().astype(np.float16)
        return np.split(embeds, np.cumsum(lengths)[:-1])


class TextTokens(_Encoder):
    """Text encoder -> last hidden state of each text's real tokens (L, D), truncated at `max_length`."""

    def __init__(self, name: str, device: str = "cpu", max_length: int = 256):
        super().__init__(name, device)
        from transformers import AutoModel, AutoTokenizer

        from affectprep.vocabulary import require_vocabulary

        self.tokenizer = AutoTokenizer.from_pretrained(name)
        require_vocabulary(self.tokenizer, name)
        self.model = AutoModel.from_pretrained(name).to(device).eval()
        self.max_length = max_length

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        hidden = self._run(self.model, **encoded).last_hidden_state.float().cpu().numpy().astype(np.float16)
        return [h[:n] for h, n in zip(hidden, encoded["attention_mask"].sum(1).tolist())]


class SpeechTokens(_Encoder):
    """Wav2Vec2-style speech encoder -> last hidden state (frames, D) of each 16 kHz utterance.

    Utterances are encoded one at a time: Wav2Vec2-base normalises its first convolution over the whole time axis,
    so padding would change a shorter utterance's frames. Each is cut at MAX_UTTERANCE_SECONDS and normalised as
    the checkpoint's feature extractor says (do_normalize), with the functions the fine-tuning path uses
    (affectprep/speech.py), so both feed the encoder the same input."""

    def __init__(self, name: str, device: str = "cpu"):
        super().__init__(name, device)
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(name).to(device).eval()
        self.normalize = normalizes_waveform(name)
        self.max_samples = int(MAX_UTTERANCE_SECONDS * SAMPLE_RATE)

    def encode(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for waveform in waveforms:
            x = self.torch.from_numpy(np.ascontiguousarray(waveform[: self.max_samples], dtype=np.float32))[None]
            if self.normalize:
                x = normalize_waveform(x)
            hidden = self._run(self.model, input_values=x).last_hidden_state
            out.append(hidden[0].float().cpu().numpy().astype(np.float16))
        return out


def array_bytes(array: np.ndarray) -> tuple[bytes, list[int]]:
    """A float16 array -> (little-endian bytes, shape), how the features stores keep arrays."""
    return np.ascontiguousarray(array, dtype="<f2").tobytes(), list(array.shape)
