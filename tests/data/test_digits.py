"""Digits as sequences: 8 tokens of 8 features, fixed disjoint splits."""

import torch

from slimformer.data.digits import load_digits_seq


def test_shapes_and_disjoint_splits():
    xtr, ytr = load_digits_seq("train")
    xte, yte = load_digits_seq("test")
    xca, _ = load_digits_seq("calib")
    assert xtr.shape == (1300, 8, 8) and xte.shape == (497, 8, 8) and xca.shape == (256, 8, 8)
    assert float(xtr.min()) == 0.0 and float(xtr.max()) == 1.0
    train_rows = {r.numpy().tobytes() for r in xtr}
    assert all(r.numpy().tobytes() in train_rows for r in xca)
    assert torch.equal(load_digits_seq("test")[0], xte)
    assert sorted(set(yte.tolist())) == list(range(10))
