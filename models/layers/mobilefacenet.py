"""MobileFaceNet (Chen et al., CCBR 2018) as the 68-point facial landmark detector that POSTER and POSTER++ use for
their landmark stream (released as `mobilefacenet_model_best.pth.tar`, from cunjian/pytorch_face_landmark).

Layout at 112 px (strides in brackets): conv1 3x3 (2) -> conv2_dw depthwise 3x3 -> conv_23 (2) -> conv_3, 4
residual depthwise units -> conv_34 (2) -> conv_4, 6 units -> conv_45 (2) -> conv_5, 2 units -> conv_6_sep 1x1 to
512 -> output_layer, the GDC head: a depthwise conv over the whole 7x7 map, Linear(512, 136), BatchNorm1d: the 68
(x, y) points. A depthwise unit is a 1x1 conv to the expansion width, a depthwise 3x3, and a linear 1x1 projection.
The feature maps POSTER++ takes are conv_3's (28x28x64), conv_4's (14x14x128) and conv_6_sep's (7x7x512).

Parameter names are the release's (`conv1.conv.weight`, `conv_3.model.0.conv_dw.bn.running_mean`,
`output_layer.linear.weight`, ...); `load_mobilefacenet_checkpoint` loads it with none missing or unexpected.
face.evoLVe's own MobileFaceNet is a recognition network (an embedding head named conv_6_dw / linear / bn, no
landmark head); it is refused with a message, since GReFEL's landmark stream must be a landmark detector.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from affectprep.config import ConfigError

from .batchnorm import BatchNorm1d, BatchNorm2d
from .checkpoints import load_exactly, read_state_dict

NUM_POINTS = 68
# Widths of conv1 / conv_3 (64), conv_4 / conv_5 (128) and conv_6_sep (512); expansion widths of conv_23 and
# conv_3, conv_34 and conv_4, conv_45, conv_5; residual units of conv_3, conv_4, conv_5 (the release's).
MOBILEFACENET_WIDTHS = (64, 128, 512)
MOBILEFACENET_EXPANSIONS = (128, 256, 512, 256)
MOBILEFACENET_UNITS = (4, 6, 2)
_RECOGNITION_HEAD = ("conv_6_dw.", "linear.", "bn.")


class ConvBlock(nn.Module):
    """conv -> BN -> PReLU (`Conv_block`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.prelu = nn.PReLU(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.prelu(self.bn(self.conv(x)))


class LinearBlock(nn.Module):
    """conv -> BN, no activation (`Linear_block`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False)
        self.bn = BatchNorm2d(out_channels)   # a 1x1 map in the GDC head: one value per channel at batch 1

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class DepthWise(nn.Module):
    """1x1 expansion, depthwise 3x3 (strided), linear 1x1 projection; a residual when `residual` (`Depth_Wise`)."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int, residual: bool = False):
        super().__init__()
        self.conv = ConvBlock(in_channels, expansion)
        self.conv_dw = ConvBlock(expansion, expansion, 3, stride, 1, groups=expansion)
        self.project = LinearBlock(expansion, out_channels)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.conv_dw(self.conv(x)))
        return x + out if self.residual else out


class Residual(nn.Module):
    def __init__(self, channels: int, units: int, expansion: int):
        super().__init__()
        self.model = nn.Sequential(*(DepthWise(channels, channels, expansion, 1, residual=True) for _ in range(units)))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LandmarkHead(nn.Module):
    """GDC: a depthwise conv over the whole final map, Linear(C, 136) and BatchNorm1d -> 68 (x, y) points."""

    def __init__(self, channels: int, map_size: int, points: int = NUM_POINTS):
        super().__init__()
        self.points = points
        self.conv_6_dw = LinearBlock(channels, channels, map_size, groups=channels)
        self.linear = nn.Linear(channels, 2 * points, bias=False)
        self.bn = BatchNorm1d(2 * points)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.linear(self.conv_6_dw(x).flatten(1))).unflatten(1, (self.points, 2))


class MobileFaceNet(nn.Module):
    """`forward(x)` -> ([conv_3, conv_4, conv_6_sep maps], landmarks (B, 68, 2)) for square faces of `input_size`."""

    def __init__(self, input_size: int = 112, widths: Sequence[int] = MOBILEFACENET_WIDTHS,
                 expansions: Sequence[int] = MOBILEFACENET_EXPANSIONS, units: Sequence[int] = MOBILEFACENET_UNITS):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"MobileFaceNet halves its input four times; input_size {input_size} is not a multiple "
                             f"of 16")
        (low, mid, out), (e23, e34, e45, e5) = widths, expansions
        self.input_size, self.channels = input_size, (low, mid, out)
        self.conv1 = ConvBlock(3, low, 3, 2, 1)
        self.conv2_dw = ConvBlock(low, low, 3, 1, 1, groups=low)
        self.conv_23 = DepthWise(low, low, e23, 2)
        self.conv_3 = Residual(low, units[0], e23)
        self.conv_34 = DepthWise(low, mid, e34, 2)
        self.conv_4 = Residual(mid, units[1], e34)
        self.conv_45 = DepthWise(mid, mid, e45, 2)
        self.conv_5 = Residual(mid, units[2], e5)
        self.conv_6_sep = ConvBlock(mid, out)
        self.output_layer = LandmarkHead(out, input_size // 16)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        low = self.conv_3(self.conv_23(self.conv2_dw(self.conv1(x))))
        mid = self.conv_4(self.conv_34(low))
        out = self.conv_6_sep(self.conv_5(self.conv_45(mid)))
        return [low, mid, out], self.output_layer(out)


def load_mobilefacenet_checkpoint(network: MobileFaceNet, path: Path | str) -> None:
    """Load the released landmark detector into `network` by parameter name; any difference is a ConfigError."""
    state = read_state_dict(path, "MobileFaceNet landmark detector")
    if not any(k.startswith("output_layer.") for k in state) and any(k.startswith(_RECOGNITION_HEAD) for k in state):
        raise ConfigError(f"{path} is a MobileFaceNet face-recognition network (an embedding head conv_6_dw / linear "
                          f"/ bn, no 68-point landmark head output_layer.*); GReFEL's landmark stream needs the "
                          f"landmark detector POSTER++ releases (mobilefacenet_model_best.pth.tar)")
    load_exactly(network, state, path, "MobileFaceNet landmark detector")
