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
    """Rows of named input tensors plus labels; item = ``({name: tensor}, label)``."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        sizes = {k: len(v) for k, v in inputs.items()}
        if any(n != len(labels) for n in sizes.values()):
            raise DataError(f"inputs and labels differ in length: {sizes}, labels {len(labels)}")
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {k: v[i] for k, v in self.inputs.items()}, self.labels[i]


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
}


def get_dataset(name: str, split: str = "test", limit: int | None = None) -> TensorDictDataset:
    """Return split ``split`` of built-in data set ``name``, optionally its first ``limit`` rows."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; built-in ones: {', '.join(sorted(DATASETS))}")
    info = DATASETS[name]
    if split not in info.splits:
        raise DataError(f"data set {name!r} has no split {split!r}; allowed: {info.splits}")
    ds = info.load(split)
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        n = min(limit, len(ds))
        ds = TensorDictDataset({k: v[:n] for k, v in ds.inputs.items()}, ds.labels[:n])
    return ds


def make_loader(ds: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0):
    """A DataLoader yielding ``({name: (B, ...)}, labels (B,))`` with a seeded shuffle."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)
