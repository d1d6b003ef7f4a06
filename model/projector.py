"""LDPv2 projector of MobileVLM V2: CLIP patch features [B, 576, 1024] -> 144 tokens of the LLM width."""
from __future__ import annotations

import math

import torch
from torch import nn


class FeatureIRLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TokenDownLayer(nn.Module):
    """2x2 average pooling of the square token grid (24x24 -> 12x12 for CLIP-336)."""

    def __init__(self, shape: tuple[int, int] = (12, 12)):
        super().__init__()
        self.dwn = nn.AdaptiveAvgPool2d(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        side = int(math.isqrt(n))
        if side * side != n:
            raise ValueError(f"LDPv2 expects a square token grid, got {n} tokens")
        x = x.permute(0, 2, 1).reshape(b, c, side, side)
        return self.dwn(x).flatten(2).transpose(1, 2)


class PosInjectLayer(nn.Module):
    """Depthwise 3x3 convolution over the 12x12 grid, added back to its input (PEG)."""

    def __init__(self, dim: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        side = int(math.isqrt(n))
        grid = x.transpose(1, 2).reshape(b, c, side, side)
        return (self.peg(grid) + grid).flatten(2).transpose(1, 2)


class LDPNetV2Projector(nn.Module):
    """State-dict keys: mlp.mlp.{0,2}.{weight,bias}, peg.peg.0.{weight,bias} (the official names)."""

    def __init__(self, mm_hidden_size: int, hidden_size: int, num_tokens: int = 144):
        super().__init__()
        side = int(math.isqrt(num_tokens))
        self.mlp = FeatureIRLayer(mm_hidden_size, hidden_size)
        self.dwn = TokenDownLayer((side, side))
        self.peg = PosInjectLayer(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peg(self.dwn(self.mlp(x)))
