"""Batch normalisation that survives a training batch with one value per channel.

`nn.BatchNorm1d` on (1, C) and `nn.BatchNorm2d` on (1, C, 1, 1) raise "Expected more than 1 value per channel when
training": one value has no variance to normalise by. That happens for the last batch of an epoch, a one-sample
batch per process, or a 1x1 map (MobileFaceNet's GDC head). These subclasses normalise such a batch with the
running statistics (as in evaluation) and leave them unchanged, since one sample cannot estimate them; every other
batch is plain batch normalisation. The state-dict names are those of torch's classes, so public checkpoints load.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _RunningStatsForSingleValues:
    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.track_running_stats and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class BatchNorm1d(_RunningStatsForSingleValues, nn.BatchNorm1d):
    """`nn.BatchNorm1d`; a training batch (1, C) uses the running statistics (module docstring)."""


class BatchNorm2d(_RunningStatsForSingleValues, nn.BatchNorm2d):
    """`nn.BatchNorm2d`; a training batch (1, C, 1, 1) uses the running statistics (module docstring)."""
