"""Factories of plain PyTorch transformers for ``package.module:factory`` specs and tests."""

from __future__ import annotations

import torch
from torch import nn


class EncoderClassifier(nn.Module):
    """``torch.nn.TransformerEncoder`` over float token features, mean-pooled, then a Linear.

    ``forward(src (B, T, d_model)) -> logits (B, num_classes)``.
    """

    def __init__(self, d_model: int = 64, nhead: int = 4, layers: int = 2, ffn: int = 128,
                 num_classes: int = 10, norm_first: bool = True):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead, ffn, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        """``src (B, T, d_model) -> logits (B, num_classes)``."""
        return self.head(self.encoder(src).mean(1))


def torch_encoder(**kwargs) -> EncoderClassifier:
    """Build an :class:`EncoderClassifier` (keyword arguments as its constructor)."""
    return EncoderClassifier(**kwargs)
