"""A tiny sequence transformer built only from operations hls4ml can synthesize.

Linear, LayerNorm, attention written with ``einsum`` and softmax, ReLU, add and mean pooling:
``forward(x (B, 8, 8)) -> logits (B, 10)`` over the sklearn digits read as 8 row-tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SeqConfig:
    """Shape of a :class:`SeqTransformer`."""

    tokens: int = 8
    features: int = 8
    dim: int = 16
    heads: int = 2
    mlp_dim: int = 32
    depth: int = 1
    num_classes: int = 10


class SeqBlock(nn.Module):
    """Pre-norm block: multi-head einsum attention, then a ReLU MLP."""

    def __init__(self, cfg: SeqConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.q, self.k, self.v = (nn.Linear(cfg.dim, cfg.dim) for _ in range(3))
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, dim) -> (B, T, dim)``."""
        b, t, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).reshape(b, t, self.heads, self.head_dim)  # (B, T, H, Dh)
        k = self.k(h).reshape(b, t, self.heads, self.head_dim)
        v = self.v(h).reshape(b, t, self.heads, self.head_dim)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim**-0.5  # (B, H, T, T)
        probs = torch.softmax(scores, dim=-1)
        att = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)  # (B, T, H*Dh)
        x = x + self.out(att)
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class SeqTransformer(nn.Module):
    """Token embedding + position, ``depth`` blocks, mean pooling, LayerNorm, Linear head."""

    def __init__(self, cfg: SeqConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Linear(cfg.features, cfg.dim)
        self.pos = nn.Parameter(torch.randn(1, cfg.tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(SeqBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    @property
    def input_shape(self) -> tuple[int, int]:
        """Shape ``(tokens, features)`` of one sample."""
        return (self.config.tokens, self.config.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, tokens, features) -> logits (B, classes)``."""
        h = self.embed(x) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h.mean(1)))
