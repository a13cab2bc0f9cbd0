"""A small pre-norm Vision Transformer, the architecture of the built-in ``vit-fmnist`` model.

Attention is written out (``q @ k^T``, softmax, ``@ v``) rather than fused, so every later stage
(softmax quantization, head pruning, hls4ml) sees its parts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a :class:`TinyViT`."""

    image_size: int = 28
    patch_size: int = 4
    in_channels: int = 1
    num_classes: int = 10
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 512
    dropout: float = 0.0

    def to_dict(self) -> dict:
        """Plain-dict form, for JSON."""
        return asdict(self)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, dim) -> (B, T, dim)``."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, T, head_dim)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, heads, T, T)
        probs = scores.softmax(dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(b, t, -1)  # (B, T, heads * head_dim)
        return self.proj(out)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, dim) -> (B, T, dim)``."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(cfg.dim), Attention(cfg.dim, cfg.heads)
        self.norm2, self.mlp = nn.LayerNorm(cfg.dim), Mlp(cfg.dim, cfg.mlp_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, dim) -> (B, T, dim)``."""
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TinyViT(nn.Module):
    """ViT classifier: patches -> [CLS] + tokens -> blocks -> norm -> head on [CLS].

    ``forward(pixel_values (B, C, H, W)) -> logits (B, num_classes)``.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        # num_classes == 0: a feature extractor returning the normalized [CLS] token (B, dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else nn.Identity()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values (B, C, H, W) -> logits (B, num_classes)``."""
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # (B, T, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])  # (B, classes)
