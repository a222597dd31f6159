"""2D U-Net backbone with a 12-way fine head and one sigmoid head per hierarchy level."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hierseg.labels import NUM_FINE_CLASSES, Hierarchy
from hierseg.spec import ModelSpec


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by normalisation and SiLU."""

    def __init__(self, cin: int, cout: int, norm: str):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.SiLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.SiLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net whose heads share one decoder: ``forward(x) -> (logits_fine, [logits_coarse per level])``.

    Inputs of any size work: they are padded (reflect) to a multiple of ``2**depth`` and the
    logits are cropped back, so tiled inference and odd patch sizes need no special casing.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        depth: int = 4,
        norm: str = "group",
        dropout: float = 0.0,
        coarse_groups: tuple[int, ...] = (5,),
        num_fine: int = NUM_FINE_CLASSES,
    ):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.stem = ConvBlock(in_channels, widths[0], norm)
        self.down = nn.ModuleList(ConvBlock(widths[i], widths[i + 1], norm) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.merge = nn.ModuleList(ConvBlock(2 * widths[i], widths[i], norm) for i in reversed(range(depth)))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.fine_head = nn.Conv2d(widths[0], num_fine, 1)
        self.coarse_heads = nn.ModuleList(nn.Conv2d(widths[0], k, 1) for k in coarse_groups)

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, w = x_BCHW.shape[-2:]
        m = 2**self.depth
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x_BCHW = F.pad(x_BCHW, (0, pad_w, 0, pad_h), mode=mode)
        skips = [self.stem(x_BCHW)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        feat = skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            feat = merge(torch.cat([up(feat), skips.pop()], dim=1))
        feat = self.dropout(feat)[..., :h, :w]
        return self.fine_head(feat), [head(feat) for head in self.coarse_heads]


def build_model(spec: ModelSpec, hierarchy: Hierarchy) -> UNet:
    return UNet(
        in_channels=spec.in_channels,
        base_channels=spec.base_channels,
        depth=spec.depth,
        norm=spec.norm,
        dropout=spec.dropout,
        coarse_groups=tuple(hierarchy.num_groups),
    )


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
