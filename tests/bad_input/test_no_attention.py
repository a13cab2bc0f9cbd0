"""A model without attention: what needs attention is refused with the cause, the rest works."""

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.errors import ConfigError, UnsupportedModelError
from slimformer.models.structure import discover
from slimformer.prune.api import prune
from slimformer.prune.config import PruneConfig
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from tests.models.test_structure_variants import fourier_net


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    return TensorDictDataset({"x": torch.randn(n, 16, 16, generator=g)},
                             torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("softmax", ["uniform", "log_sqrt2"])
def test_softmax_quantizer_asked_for_without_attention(softmax):
    with pytest.raises(UnsupportedModelError, match="no attention was found; set softmax: none"):
        quantize(fourier_net(), QuantConfig(method="minmax", softmax=softmax), _data())


def test_default_softmax_quantizes_the_linears_with_a_note():
    res = quantize(fourier_net(), QuantConfig(method="minmax"), _data())
    assert any(n.startswith("no attention found: no softmax quantizer built") for n in res.notes)


def test_pruning_heads_without_attention():
    model, data = fourier_net(), _data()
    with pytest.raises(UnsupportedModelError, match="no attention found"):
        prune(model, PruneConfig(structures=["heads", "mlp"]), data)
    x = {"x": torch.randn(2, 16, 16)}
    s = discover(model, x, require_attention=False)
    with pytest.raises(ConfigError, match="the model has no heads .* leave heads out"):
        prune(model, PruneConfig(structures=["heads", "mlp"]), data, structure=s, inputs=x)
