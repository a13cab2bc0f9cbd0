"""The output floor as a fallback: the fewest activation quantizers kept float, by measured effect."""

import copy
import re

import pytest
import torch
from torch import nn

from slimformer.data.datasets import TensorDictDataset, get_dataset
from slimformer.errors import CalibrationError, ConfigError
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.models.structure import discover
from slimformer.quantize.api import quantize
from slimformer.quantize.check import float_leaves, sqnr_db
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference
from slimformer.quantize.serialize import load_quantized, save_quantized


@pytest.fixture(scope="module")
def digits():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    return lm, get_dataset("digits-seq", "calib"), get_dataset("digits-seq", "test")


# the fallback itself is under test: the outlier migration (smooth, where the config has it) off
# smooth off; attention quantized (min/max's auto leaves it float): the sites these tests count
NO_SMOOTH = {"smooth": "off", "attention": "quantized"}


def _untimed(notes: list[str]) -> list[str]:
    return [re.sub(r"\d+(\.\d+)? s\b", "<t> s", n) for n in notes]


def _out_db(model, qmodel, x) -> float:
    with torch.no_grad():
        ref, got = float_leaves(model(**x)), float_leaves(qmodel(**x))
    return sqnr_db(torch.cat([r.reshape(-1) for r in ref]), torch.cat([g.reshape(-1) for g in got]))


def _massive(lm, factor=1e4, channel=0):
    """A copy of the trained model with one massive channel out of a norm (same float function).

    The norm's gain and shift of ``channel`` are multiplied by ``factor`` and the Linears it feeds
    divide that input column by it: the float outputs stay (to rounding), while the norm's
    output, the shared input quantizer of those Linears, holds one channel ``factor`` times the
    rest (as trained transformers' outlier features).
    """
    model = copy.deepcopy(lm.module)
    norm = next(n for n in discover(model, lm.example_inputs(2)).norms if len(n.linears) == 1)
    params, mods = dict(model.named_parameters()), dict(model.named_modules())
    with torch.no_grad():
        mods[norm.module].weight[channel] *= factor
        mods[norm.module].bias[channel] *= factor
        for w in norm.linears:
            params[w][:, channel] /= factor
    return model, f"norm:{norm.module}:8"


def test_massive_activation_is_kept_float_and_the_floor_holds(digits, tmp_path):
    lm, calib, test = digits
    model, site = _massive(lm)
    x = {"x": test.inputs["x"][:128]}
    assert _out_db(lm.module, model, x) > 60  # the injection keeps the float function
    refused = quantize(model, QuantConfig(method="minmax", min_output_sqnr_db=None, **NO_SMOOTH),
                       calib)
    assert refused.output_sqnr_db < 10 and not refused.float_activations
    assert _out_db(model, refused.model, x) < 10  # on test rows too: the floor fails
    res = quantize(model, QuantConfig(method="minmax", **NO_SMOOTH), calib)
    # the measured ranking keeps that one site float, and the floor holds on unseen test rows
    assert res.float_activations == [site]
    assert res.output_sqnr_db >= 10 and _out_db(model, res.model, x) >= 10
    assert res.model.config.float_activations == [site]
    assert any("1 of 16 activation quantizers kept float" in n and site in n for n in res.notes)
    assert any("budget met" in n and "on 32 calibration rows past the 128" in n
               for n in res.notes)
    # weights stay quantized: every Linear of the model is still quantized
    assert len(res.model.quant.linears) == len(refused.model.quant.linears)
    assert all(not lq.act.keep_float or lq.act.name == site
               for lq in res.model.quant.linears.values())
    # the artifact records the kept-float site: the reloaded model computes the same outputs
    # (every model tensor is in the artifact, the injected norm too), in both forms
    for form, qm in (("sim", res.model), ("inf", to_inference(res.model))):
        save_quantized(qm, tmp_path / form, ZooSpec(name="vit-digits-seq"))
        back = load_quantized(tmp_path / form)
        assert [a.name for a in back.quant.acts.values() if a.keep_float] == [site]
        with torch.no_grad():
            assert torch.equal(back(**x), qm(**x))


def test_model_over_the_floor_is_unchanged(digits):
    lm, calib, _ = digits
    res = quantize(lm.module, QuantConfig(method="minmax"), calib)
    off = quantize(lm.module, QuantConfig(method="minmax", min_output_sqnr_db=None), calib)
    assert res.output_sqnr_db >= 10 and not res.float_activations
    assert _untimed(res.notes) == _untimed(off.notes)  # the same, but for wall-clock seconds
    assert not any("fallback" in n or "budget" in n for n in res.notes)
    assert res.model.config.float_activations == []
    a, b = res.model.state_dict(), off.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _WeightCollapse(nn.Module):
    """One Linear whose every row holds a 1e6 weight on an input that is always 0.

    Per-row weight ranges are set by that weight: at 8 bits every other weight rounds to 0, so
    the output loses its signal whatever the activations (the fallback cannot help).
    """

    def __init__(self, d=16):
        super().__init__()
        self.fc = nn.Linear(d, d)
        with torch.no_grad():
            self.fc.weight[:, 0] = 1e6
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x)


def test_refused_when_all_activations_float_miss_the_floor():
    torch.manual_seed(0)
    x = torch.randn(16, 4, 16)
    x[..., 0] = 0
    calib = TensorDictDataset({"x": x}, torch.zeros(16, dtype=torch.long))
    with pytest.raises(CalibrationError, match="also with every activation quantizer kept float"):
        quantize(_WeightCollapse().eval(), QuantConfig(method="minmax", softmax="none"), calib)


def test_float_activations_pattern_must_match(digits):
    lm, calib, _ = digits
    with pytest.raises(ConfigError, match="matches no activation quantizer"):
        quantize(lm.module, QuantConfig(method="minmax", float_activations=["in:nothing*"]),
                 calib)


def test_ranking_from_one_backward_finds_the_site_that_carries_the_error(digits):
    from slimformer.quantize.holdout import Rows
    from slimformer.quantize.judge import Judge
    from slimformer.quantize.sensitivity import rank
    from slimformer.quantize.tiers import sites

    lm, calib, _ = digits
    model, site = _massive(lm)
    res = quantize(model, QuantConfig(method="minmax", min_output_sqnr_db=None, **NO_SMOOTH),
                   calib)
    found = sites(res.model)
    gains = rank(res.model, Rows(calib, range(16)), found, "db")
    order = sorted(gains, key=lambda n: -gains[n][1])
    assert order[0] == site and gains[site][1] > 10 * abs(gains[order[1]][1])
    assert all(g[0] == 0 for g in gains.values())  # W8A8: no 8-bit tier
    # measured on unseen rows: that site float alone recovers the output, the runner-up not
    judge = Judge(res.model, Rows(calib, range(128, 160)), 32, {"db"})
    db = {}
    for name in order[:2]:
        next(s for s in found if s.name == name).set(2)
        db[name] = judge.measure()["db"]
        next(s for s in found if s.name == name).set(0)
    assert db[site] > 10 > db[order[1]]
