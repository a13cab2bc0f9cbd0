"""RepQ reparameterization is exact in float, on pre-norm and post-norm models of every family."""

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig


def _out(o):
    if isinstance(o, torch.Tensor):
        return o
    for k in ("logits", "last_hidden_state", "logits_per_image"):
        if getattr(o, k, None) is not None:
            return getattr(o, k)
    return next(iter(o.values())) if isinstance(o, dict) else o[0]


def _calib(lm, n=16, seed=0):
    x = lm.example_inputs(n, seed=seed)
    return TensorDictDataset(x, torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "t5", "torch-encoder",
                                  "torch-encoder-postnorm", "timm-vit", "clip", "llama"])
def test_reparameterization_is_exact_in_float(name):
    lm = load_model(GENERALITY[name])
    x = lm.example_inputs(4, seed=123)
    with torch.no_grad():
        ref = _out(lm.module(**x)).double()
    res = quantize(lm.module, QuantConfig(method="repq", weight_bits=4, act_bits=4,
                                          repq_sites="all"), _calib(lm))
    assert any("reparameterized" in n for n in res.notes)
    res.model.quant.set_mode("float")
    with torch.no_grad():
        got = _out(res.model(**x)).double()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"
    # and the original model was not touched (quantize copies it)
    with torch.no_grad():
        assert torch.equal(_out(lm.module(**x)).double(), ref)
