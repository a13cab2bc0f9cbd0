"""Symmetric quantization (``QuantConfig.symmetric``): signed grids with zero point 2^(b-1) on the
unsigned codes, RepQ still exact (float model and codes), accuracy on real data."""

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset, get_dataset
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.models.structure import discover
from slimformer.pipeline import evaluate_model
from slimformer.quantize.act import ActQuantizer, ProbQuantizer
from slimformer.quantize.api import quantize
from slimformer.quantize.build import build
from slimformer.quantize.capture import run as _run
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.quantizers import WeightQuantizer, uniform_codes
from slimformer.quantize.repq import reparameterize


def test_weight_quantizer_symmetric_grid_and_pow2():
    torch.manual_seed(0)
    w = torch.randn(6, 32) * torch.linspace(0.1, 3, 6)[:, None]
    for bits in (8, 4):
        wq = WeightQuantizer(bits)
        wq.symmetric = True
        wq.calibrate(w)
        amax = w.abs().amax(1, keepdim=True)
        assert torch.equal(wq.scale, amax / (2 ** (bits - 1) - 1))
        assert torch.all(wq.zero == 2 ** (bits - 1))
        codes = uniform_codes(w, wq.scale, wq.zero, bits)
        assert codes.min() >= 1 and codes.max() <= 2**bits - 1  # signed [-(2^(b-1)-1), 2^(b-1)-1]
        wq.pow2 = True
        wq.calibrate(w)
        log = torch.log2(wq.scale)
        assert torch.equal(log, log.round()) and torch.all(wq.zero == 2 ** (bits - 1))
        err = (wq(w) - w).abs() / wq.scale
        assert err.max() <= 0.5 + 1e-6  # the rounded-up scale still covers the channel


def test_act_and_uniform_prob_quantizers_symmetric():
    act = ActQuantizer("a", 8)
    act.symmetric = True
    act.set_range(torch.tensor([-0.5]), torch.tensor([2.54]))
    s, z = act.scale_zero()
    assert torch.allclose(s, torch.tensor([0.02])) and float(z) == 128
    act.pow2 = True
    assert float(act.scale_zero()[0]) == 2.0**-5
    p = ProbQuantizer("p", 8, "uniform")
    p.symmetric, p.delta = True, torch.tensor(0.5)
    probs = torch.rand(1000)
    q = p.quant(probs)
    steps = q / (0.5 / 127)
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert steps.max().round() == 127 and steps.min() >= 0  # the non-negative half of int8


def _calib(lm, n=16):
    return TensorDictDataset(lm.example_inputs(n, seed=0), torch.zeros(n, dtype=torch.long))


def _codes_by_site(qmodel, inputs) -> dict[str, torch.Tensor]:
    """Codes every per-channel (later per-tensor) activation quantizer gives, in float mode."""
    qmodel.quant.set_mode("float")
    found = {}
    for act in qmodel.quant.acts.values():
        def fwd(x, act=act):
            x = act.transform(x)
            found[act.name] = uniform_codes(x, *act.scale_zero(), act.bits)
            return x

        act.forward = fwd
    with torch.no_grad():
        qmodel(**inputs)
    for act in qmodel.quant.acts.values():
        del act.forward
    return found


@pytest.mark.parametrize("name,pow2", [("vit-digits-seq", False), ("vit-digits-seq", True),
                                       ("torch-encoder-postnorm", False)])
def test_reparameterization_is_exact_with_symmetric_scales(name, pow2):
    lm = load_model(ZooSpec(name=name) if name.startswith("vit-") else GENERALITY[name])
    calib = get_dataset(lm.dataset, "calib", 64) if lm.dataset else _calib(lm)
    x = lm.example_inputs(8, seed=3)
    smap = discover(lm.module, x)
    cfg = QuantConfig(method="repq", symmetric=True, power_of_two_scales=pow2, calib_samples=64)
    with torch.no_grad():
        ref = lm.module(**x)
    qm = build(lm.module, smap, cfg)
    qm.quant.set_mode("observe")
    _run(qm, calib, cfg)
    per_channel = [a for a in qm.quant.acts.values() if a.per_channel]
    assert per_channel
    for a in qm.quant.acts.values():
        a.calibrate("search")
    before = _codes_by_site(qm, x)
    scales = {a.name: a.scale_zero()[0].clone() for a in per_channel}
    notes = reparameterize(qm, smap)
    assert len(notes) == len(per_channel)
    after = _codes_by_site(qm, x)
    with torch.no_grad():
        got = qm(**x)
    out = ref if isinstance(ref, torch.Tensor) else ref[0]
    got = got if isinstance(got, torch.Tensor) else got[0]
    rel = (got.double() - out.double()).norm() / out.double().norm()
    assert rel < 1e-5, f"float model changed by reparameterization: {rel:.2e}"
    for a in per_channel:
        s_t, z_t = a.scale_zero()
        assert not a.per_channel and s_t.numel() == 1 and float(z_t) == 2 ** (a.bits - 1)
        assert a.shift is None or torch.all(a.shift == 0)  # no zero-point shift
        if pow2:
            assert float(s_t) == 2.0 ** round(float(torch.log2(s_t)))
        else:
            assert torch.isclose(s_t, scales[a.name].mean(), rtol=1e-6)
        same = float((before[a.name] == after[a.name]).float().mean())
        # identical codes (pow2: exactly; else up to float rounding at ties of a few values)
        assert same == 1.0 if pow2 else same >= 0.9999, (a.name, same)


@pytest.mark.slow
def test_symmetric_w8a8_accuracy_on_digits():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    calib, test = get_dataset(lm.dataset, "calib"), get_dataset(lm.dataset, "test")
    assert len(test) == 497
    preds, labels = evaluate_model(lm.module, test)
    fp32 = float((preds == labels).float().mean())
    res = quantize(lm.module, QuantConfig(method="repq", symmetric=True), calib)
    assert all(torch.all(lq.wq.zero == 128) for lq in res.model.quant.linears.values())
    preds, _ = evaluate_model(res.model, test)
    acc = float((preds == labels).float().mean())
    assert acc >= fp32 - 0.01, f"symmetric W8A8 {acc:.4f} vs FP32 {fp32:.4f}"
