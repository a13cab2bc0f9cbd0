"""Fixtures shared across test folders."""

import pytest
import torch

from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec

PLANTED_CHANNEL = 37  # vit-fmnist has 128 hidden channels


@pytest.fixture
def planted_vit():
    """vit-fmnist (trained) with one massive hidden dimension after its first norm, as
    BERT-family encoders carry (gain x60, shift +40): the outlier-channel path is needed."""
    lm = load_model(ZooSpec(name="vit-fmnist"))
    with torch.no_grad():
        norm = lm.module.blocks[0].norm1
        norm.weight[PLANTED_CHANNEL] *= 60.0
        norm.bias[PLANTED_CHANNEL] += 40.0
    return lm
