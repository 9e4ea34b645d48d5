"""A user's video classification checkpoint (transformers AutoModelForVideoClassification, e.g. VideoMAE),
used by the `emotions` stage in place of the baseline."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .checkpoints import checkpoint_identity

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HFVideoClassifier:
    def __init__(self, model: str, *, device: str = "cpu", revision: str | None = None):
        import torch
        from transformers import AutoModelForVideoClassification

        self.device = device
        self.model = AutoModelForVideoClassification.from_pretrained(model, revision=revision).to(device).eval()
        config = self.model.config
        self.labels = [str(config.id2label[i]).lower() for i in range(config.num_labels)]
        self.num_frames = int(getattr(config, "num_frames", 16))
        self.size = int(getattr(config, "image_size", 224))
        processor = _processor_config(model)
        self.mean = np.asarray(processor.get("image_mean", IMAGENET_MEAN), np.float32)
        self.std = np.asarray(processor.get("image_std", IMAGENET_STD), np.float32)
        self.identity: dict[str, Any] = {"classifier": checkpoint_identity(model, revision)}
        self._torch = torch

    def predict_proba(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """(T, H, W, 3) uint8 RGB clips -> (N, num_labels) class probabilities."""
        batch = np.stack([self._prepare(clip) for clip in clips])
        with self._torch.no_grad():
            logits = self.model(pixel_values=self._torch.from_numpy(batch).to(self.device)).logits
        return self._torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def _prepare(self, clip: np.ndarray) -> np.ndarray:
        """Resize and normalise ourselves: the HF video processors need torchvision, which may be absent."""
        picks = np.linspace(0, len(clip) - 1, self.num_frames).round().astype(int)
        frames = [cv2.resize(clip[i], (self.size, self.size), interpolation=cv2.INTER_AREA) for i in picks]
        array = (np.stack(frames).astype(np.float32) / 255.0 - self.mean) / self.std
        return array.transpose(0, 3, 1, 2)   # (T, C, H, W), as VideoMAE expects


def _processor_config(model: str) -> dict[str, Any]:
    path = Path(model) / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
