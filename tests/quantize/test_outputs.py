"""Quantization of base models without class scores (a BERT encoder, a T5 encoder-decoder): every
method runs, repquant's output-error check covers every output, and W8A8 keeps every output
close to float (fan-in scaled weights, so that quantization error is visible)."""

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.models import outputs as O
from slimformer.models.generality import GENERALITY, fan_in_init
from slimformer.models.loading import load_model
from slimformer.quantize.api import _output_error, quantize
from slimformer.quantize.config import QuantConfig

BASES = {"bert-base": GENERALITY["bert"].model_copy(update={"task": "base"}),
         "t5": GENERALITY["t5"]}


def _base(name):
    lm = load_model(BASES[name])
    fan_in_init(lm.module, lm.example_inputs(2))
    x = lm.example_inputs(16, seed=3)
    return lm, TensorDictDataset(x, torch.zeros(16, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(BASES))
def test_repquant_on_a_base_model_keeps_every_output(name):
    lm, calib = _base(name)
    x = lm.example_inputs(4, seed=9)
    with torch.no_grad():
        ref = O.leaves(lm.module(**x))
    assert O.class_scores(lm.module(**x)) is None and len(ref) >= 2
    cfg = QuantConfig(method="repquant", calib_samples=16, clip_steps=5, recon_steps=5)
    res = quantize(lm.module, cfg, calib)
    assert any("learned rounding" in n and "model output error" in n for n in res.notes)
    with torch.no_grad():
        got = O.leaves(res.model(**x))
    stats = O.OutputStats()
    stats.add(ref, got)
    per = stats.result()["outputs"]
    assert list(per) == list(ref)
    # W8A8 keeps every output (measured 2026-12: bert 25.7 / 17.1 dB, t5 13.8 / 18.3 dB; minmax
    # is higher on both, which issue 15 item 6 is about)
    assert min(m["sqnr_db"] for m in per.values()) > 10, per


def test_output_error_counts_every_output():
    lm, calib = _base("t5")
    res = quantize(lm.module, QuantConfig(method="minmax", calib_samples=16), calib)
    cfg = QuantConfig(method="minmax", calib_samples=16)
    err = _output_error(res.model, calib, cfg)
    # the same number from the definition: mean over outputs of ||q - f||^2 / ||f||^2
    q = res.model.quant
    with torch.no_grad():
        q.set_mode("float")
        ref = O.leaves(res.model(**calib.inputs))
        q.set_mode("quant")
        got = O.leaves(res.model(**calib.inputs))
    want = sum(float(((got[k] - r) ** 2).sum() / (r ** 2).sum()) for k, r in ref.items()) / len(ref)
    assert err == pytest.approx(want, rel=1e-4)
    assert err > 0
