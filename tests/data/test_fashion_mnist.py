"""Built-in Fashion-MNIST: sizes, disjoint calibration split, clear error when missing."""

import numpy as np
import pytest

from slimformer.data import fashion_mnist
from slimformer.data.datasets import get_dataset
from slimformer.errors import DataError


def test_splits_and_sizes():
    tr_x, tr_y = fashion_mnist.load_arrays("train")
    te_x, te_y = fashion_mnist.load_arrays("test")
    assert tr_x.shape == (60000, 28, 28) and te_x.shape == (10000, 28, 28)
    assert sorted(np.unique(te_y)) == list(range(10))
    ds = get_dataset("fashion-mnist", "calib")
    assert len(ds) == fashion_mnist.CALIB_SIZE
    assert ds.inputs["pixel_values"].shape == (1024, 1, 28, 28)


def test_calibration_is_drawn_from_train_only():
    cal_x, _ = fashion_mnist.load_arrays("calib")
    te_x, _ = fashion_mnist.load_arrays("test")
    tr_x, _ = fashion_mnist.load_arrays("train")
    test_rows = {r.tobytes() for r in te_x}
    train_rows = {r.tobytes() for r in tr_x}
    cal_rows = [r.tobytes() for r in cal_x]
    assert all(r in train_rows for r in cal_rows)
    # Fashion-MNIST has a few images duplicated across splits; calibration must not be test data
    # beyond those few accidental duplicates
    assert sum(r in test_rows for r in cal_rows) <= 2
    again, _ = fashion_mnist.load_arrays("calib")
    assert np.array_equal(again, cal_x)  # fixed seed


def test_missing_data_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DataError) as e:
        fashion_mnist.load_arrays("test")
    assert "dataset-fashion-mnist" in str(e.value) and "apt-get install" in str(e.value)


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="built-in ones: digits-seq, fashion-mnist, "
                       "nyt-editorials, trec, vader-movie"):
        get_dataset("cifar")
    with pytest.raises(DataError, match="no split 'val'"):
        get_dataset("fashion-mnist", "val")
