"""IR-50: the face-recognition ResNet of face.evoLVe (Wang et al., 2021; "improved residual" units of ArcFace),
the image backbone of POSTER, POSTER++ and GReFEL, pre-trained on MS-Celeb-1M.

An improved residual unit is BN -> 3x3 conv -> PReLU -> 3x3 conv (strided) -> BN, plus a shortcut (a 1x1 strided
conv + BN where the width changes, else a strided identity). The stem is a stride-1 3x3 conv + BN + PReLU, so a
112 px face gives maps of 56, 28, 14 and 7 after the four stages of widths 64, 128, 256, 512 (3, 4, 14, 3 units).
Like POSTER++, GReFEL uses the outputs of the first three stages (56, 28, 14 px) and builds only those.

Parameter names are face.evoLVe's (`input_layer.*`, `body.<unit>.shortcut_layer.*`, `body.<unit>.res_layer.*`),
so its released IR-50 (`backbone_ir50_ms1m_epoch120.pth`, also POSTER's `ir50.pth`) loads by name with
`load_ir50_checkpoint`; POSTER++'s split naming (`body1.*`, `body2.*`, `body3.*`, one per stage) loads too.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from .checkpoints import load_exactly, read_state_dict

IR50_WIDTHS = (64, 128, 256)        # the first three of IR-50's (64, 128, 256, 512)
IR50_UNITS = (3, 4, 14)             # the first three of IR-50's (3, 4, 14, 3)
# Parts of the released IR-50 that GReFEL does not run: the fourth stage (body.21-23) and the recognition
# embedding head (BN, dropout, flatten, Linear(512*7*7, 512), BN1d).
_UNUSED_HEAD = "output_layer."
_STAGE_KEY = re.compile(r"^body(\d+)\.(\d+)\.(.*)$")    # POSTER++: body1.0.res_layer.0.weight
_UNIT_KEY = re.compile(r"^body\.(\d+)\.")


class ImprovedResidualUnit(nn.Module):
    """face.evoLVe's `bottleneck_IR`: res_layer(x) + shortcut_layer(x)."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth))

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    """The IR stem and stages; `forward` returns every stage's output map (each stage halves the size)."""

    def __init__(self, widths: Sequence[int] = IR50_WIDTHS, units: Sequence[int] = IR50_UNITS):
        super().__init__()
        if len(widths) != len(units) or not widths or min(units) < 1:
            raise ValueError(f"IR backbone: one width and at least one unit per stage, got {widths}, {units}")
        self.widths, self.units = tuple(widths), tuple(units)
        self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                         nn.PReLU(widths[0]))
        body, channels = [], widths[0]
        for width, count in zip(widths, units):
            for i in range(count):
                body.append(ImprovedResidualUnit(channels, width, 2 if i == 0 else 1))
                channels = width
        self.body = nn.Sequential(*body)
        self.stage_ends = [sum(units[:i + 1]) - 1 for i in range(len(units))]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.input_layer(x)
        maps = []
        for index, unit in enumerate(self.body):
            x = unit(x)
            if index in self.stage_ends:
                maps.append(x)
        return maps


def load_ir50_checkpoint(backbone: IRBackbone, path: Path | str) -> list[str]:
    """Load a released IR-50 into `backbone` by parameter name; returns the keys left out on purpose (the
    stages `backbone` does not build and the recognition head). Any other difference is a ConfigError."""
    state = read_state_dict(path, "IR-50")
    if any(_STAGE_KEY.match(key) for key in state):
        state = _from_split_stages(state, backbone.units)
    ignored = sorted(key for key in state if key.startswith(_UNUSED_HEAD)
                     or ((m := _UNIT_KEY.match(key)) and int(m.group(1)) >= len(backbone.body)))
    load_exactly(backbone, {k: v for k, v in state.items() if k not in set(ignored)}, path, "IR-50")
    return ignored


def _from_split_stages(state: dict[str, Tensor], units: Sequence[int]) -> dict[str, Tensor]:
    """POSTER++'s names (body<stage>.<unit>.*, stages from 1) -> face.evoLVe's (body.<unit over all stages>.*)."""
    offsets = [sum(units[:i]) for i in range(len(units))]
    renamed = {}
    for key, value in state.items():
        match = _STAGE_KEY.match(key)
        if match and 1 <= int(match.group(1)) <= len(units):
            stage, unit, rest = int(match.group(1)), int(match.group(2)), match.group(3)
            key = f"body.{offsets[stage - 1] + unit}.{rest}"
        renamed[key] = value
    return renamed
