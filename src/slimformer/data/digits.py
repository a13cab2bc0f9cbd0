"""scikit-learn's digits (1,797 8x8 images) read as sequences of 8 tokens of 8 features.

Values are scaled to [0, 1]. Fixed split (seed 7): 497 test images, 1,300 train; calib is 256
images drawn from train.
"""

from __future__ import annotations

import numpy as np
import torch

TEST_SIZE, CALIB_SIZE, SEED = 497, 256, 7


def load_digits_seq(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``(N, 8, 8)`` float32 (row r of the image = token r) and labels ``(N,)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = np.random.default_rng(SEED).permutation(len(y))
    test, train = np.sort(perm[:TEST_SIZE]), np.sort(perm[TEST_SIZE:])
    calib = np.sort(np.random.default_rng(SEED + 1).choice(train, CALIB_SIZE, replace=False))
    idx = {"train": train, "test": test, "calib": calib}[split]
    return x[idx], y[idx]
