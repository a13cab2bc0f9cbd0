"""The no-gradient fast path of fake quantization and the activation observer's finite check."""

import pytest
import torch

from slimformer.errors import CalibrationError
from slimformer.quantize.act import ActQuantizer
from slimformer.quantize.quantizers import fake_uniform, round_ste


def _reference(x, scale, zero, bits):
    q = torch.clamp(round_ste(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_fake_uniform_in_place_equals_the_straight_through_form(per_channel, bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 64, generator=g) * 3
    x[0, 0, :4] = torch.tensor([0.5, -0.5, 1e6, -1e6])  # ties and clipping
    if per_channel:
        scale = torch.rand(64, generator=g) * 0.05 + 1e-3
        zero = torch.randint(0, 2**bits, (64,), generator=g).float()
    else:
        scale, zero = torch.tensor(0.5), torch.tensor(float(2 ** (bits - 1)))
    with torch.no_grad():
        fast = fake_uniform(x, scale, zero, bits)
    assert torch.equal(fast, _reference(x, scale, zero, bits))  # bit for bit
    assert x[0, 0, 2] == 1e6  # the input is not written to
    xg = x.clone().requires_grad_()
    y = fake_uniform(xg, scale, zero, bits)
    y.sum().backward()  # with gradients: the straight-through form
    assert torch.equal(y.detach(), fast) and xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_observer_refuses_non_finite_activations_before_recording(bad):
    act = ActQuantizer("in:layer.weight", 8)
    act.observe(torch.ones(2, 3, 4))
    x = torch.ones(2, 3, 4)
    x[1, 2, 3] = bad
    with pytest.raises(CalibrationError, match="NaN or inf in the calibration activations at "
                                               "in:layer.weight"):
        act.observe(x)
    assert float(act._max.max()) == 1.0 and len(act._rows) == 1  # nothing of it recorded
