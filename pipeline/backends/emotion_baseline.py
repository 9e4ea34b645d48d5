"""The baseline emotion classifier affectprep trains itself: a softmax regression on clip motion descriptors.

It exists to give CATE its top-3 candidates without a video model: cheap to train per cross-fitting fold, so every
sample can be predicted by a model that never saw its label.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

GRID = 7          # motion is pooled over a GRID x GRID layout of the aligned face
SIDE = 56         # aligned crops are shrunk to SIDE x SIDE before measuring motion


def clip_descriptor(crops: Sequence[bytes]) -> np.ndarray:
    """Where and how the aligned face moves: dense optical flow from the first frame to the frame that moved most,
    and the mean absolute change per cell, pooled on a grid. Rigid face motion is removed by alignment upstream."""
    gray = [cv2.resize(cv2.imdecode(np.frombuffer(c, np.uint8), cv2.IMREAD_GRAYSCALE), (SIDE, SIDE),
                       interpolation=cv2.INTER_AREA) for c in crops]
    frames = np.stack(gray).astype(np.float32)
    change = np.abs(frames - frames[0])
    apex = int(change.mean(axis=(1, 2)).argmax())
    flow = cv2.calcOpticalFlowFarneback(gray[0], gray[apex], None, 0.5, 2, 9, 3, 5, 1.1, 0)
    cells = SIDE // GRID
    pooled = lambda a: a.reshape(GRID, cells, GRID, cells, -1).mean(axis=(1, 3)).reshape(-1)  # noqa: E731
    mean_change = change.mean(axis=0)[..., None]
    return np.concatenate([pooled(flow), pooled(mean_change) / 16.0]).astype(np.float32)


class SoftmaxRegression:
    """Multinomial logistic regression with L2, standardised inputs and class weights by inverse frequency."""

    def __init__(self, num_classes: int, *, epochs: int = 300, lr: float = 0.05, weight_decay: float = 1e-3,
                 seed: int = 3407):
        self.num_classes, self.epochs, self.lr, self.weight_decay, self.seed = (num_classes, epochs, lr,
                                                                               weight_decay, seed)

    def fit(self, x: np.ndarray, y: np.ndarray) -> SoftmaxRegression:
        self.mean = x.mean(axis=0)
        self.std = x.std(axis=0) + 1e-6
        generator = torch.Generator().manual_seed(self.seed)
        inputs = torch.from_numpy((x - self.mean) / self.std)
        targets = torch.from_numpy(y.astype(np.int64))
        counts = np.bincount(y, minlength=self.num_classes).astype(np.float32)
        weights = torch.from_numpy(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / self.num_classes, 0))
        layer = torch.nn.Linear(x.shape[1], self.num_classes)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.01)
            layer.bias.zero_()
        optimiser = torch.optim.Adam(layer.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss(weight=weights.float())
        for _ in range(self.epochs):
            optimiser.zero_grad()
            loss_fn(layer(inputs), targets).backward()
            optimiser.step()
        self.layer = layer
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = self.layer(torch.from_numpy((x - self.mean) / self.std))
        return torch.softmax(logits, dim=1).numpy()
