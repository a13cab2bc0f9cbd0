"""to_brevitas: step 0 reproduces the PTQ model; gradients reach every learned scale."""

import math

import pytest
import torch

from slimformer.data.datasets import get_dataset
from slimformer.errors import UnsupportedModelError
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.qat.convert import learned_parameters, to_brevitas
from slimformer.qat.layers import QatLinear
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.quantizers import dynamic_params, uniform_codes


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    return 10 * math.log10(float((ref**2).sum()) / max(float(((ref - got) ** 2).sum()), 1e-30))


@pytest.fixture(scope="module")
def digits():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    return lm, get_dataset("digits-seq", "calib"), get_dataset("digits-seq", "test").inputs["x"][:256]


def _input_codes(qm, bm, x):
    """Integer input codes of every quantized Linear, ours and Brevitas's, in call order."""
    ours, theirs, hooks = [], [], []
    acts = {id(lq.act): lq.act for lq in qm.quant.linears.values()}
    for act in acts.values():
        def grab(m, i, o, act=act):
            v = act.transform(i[0])
            s, z = (act.scale_zero() if act.dynamic is None
                    else dynamic_params(v, act.bits, act.dynamic == "token"))
            ours.append(uniform_codes(v, s, z, act.bits)
                        - (2 ** (act.bits - 1) if act.symmetric else 0))
        hooks.append(act.register_forward_hook(grab))
    proxies = {id(m.input_quant): m.input_quant for m in bm.modules() if isinstance(m, QatLinear)}
    for p in proxies.values():
        hooks.append(p.register_forward_hook(lambda m, i, o: theirs.append(o.int().float())))
    with torch.no_grad():
        qm(x=x), bm(x=x)
    for h in hooks:
        h.remove()
    return ours, theirs


@pytest.mark.parametrize("bits,method,symmetric", [(8, "repq", False), (4, "repq", False),
                                                   (4, "minmax", True)])
def test_step_zero_reproduces_ptq(digits, bits, method, symmetric):
    lm, calib, x = digits
    qm = quantize(lm.module, QuantConfig(method=method, weight_bits=bits, act_bits=bits,
                                         calib_samples=64, symmetric=symmetric), calib).model
    bm = to_brevitas(qm)
    n_linear = len(qm.quant.linears)
    assert sum(isinstance(m, QatLinear) for m in bm.modules()) == n_linear
    assert len(bm.quant.linears) == 0 and len(bm.quant.attention) == len(qm.quant.attention)
    with torch.no_grad():
        ref, got, fl = qm(x=x), bm(x=x), lm.module(x=x)
    # measured: W8A8 61.2 dB (one input code in ~30,000 flips by float rounding, then spreads),
    # W4A4 ~337 dB (identical codes); PTQ vs float is 33 / 9 / 7 dB
    assert sqnr_db(ref, got) >= (60 if bits == 4 else 50) > sqnr_db(fl, ref) + 10
    assert torch.equal(ref.argmax(1), got.argmax(1))
    ours, theirs = _input_codes(qm, bm, x)
    assert len(ours) == len(theirs) == n_linear
    for a, b in zip(ours, theirs, strict=True):  # every Linear input, in call order
        assert float(((a - b).abs() <= 1).float().mean()) >= 0.999
    assert torch.equal(ours[0], theirs[0])  # the first input: no earlier rounding to inherit


def test_gradients_reach_every_learned_scale(digits):
    lm, calib, x = digits
    qm = quantize(lm.module, QuantConfig(method="repq", weight_bits=4, act_bits=4,
                                         calib_samples=64), calib).model
    bm = to_brevitas(qm)
    x = x[:32]
    with torch.no_grad():
        target = lm.module(x=x)
    ((bm(x=x) - target) ** 2).mean().backward()
    params = learned_parameters(bm)
    scales = {n: p for n, p in params.items() if "scaling_impl" in n}
    # one weight scale per Linear, one input scale per shared input quantizer
    assert len(scales) == len(qm.quant.linears) + len({id(q.act) for q in qm.quant.linears.values()})
    for name, p in scales.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for name, p in params.items():  # zero points: gradient only from clamped values (LSQ+)
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert all(m.weight.grad is not None for m in bm.modules() if isinstance(m, QatLinear))
    assert all(p.grad is None for p in qm.parameters())  # the PTQ model is left as it was


def test_unsupported_sites_are_refused(digits):
    lm, calib, _ = digits
    qm = quantize(lm.module, QuantConfig(method="minmax", weight_only=True, weight_bits=4,
                                         group_size=16, calib_samples=16), calib).model
    with pytest.raises(UnsupportedModelError, match="weight groups"):
        to_brevitas(qm)


@pytest.mark.parametrize("symmetric", [True, False])
def test_power_of_two_scales_convert_exactly_and_stay_powers_of_two(digits, symmetric):
    """FPGA targets (``power_of_two_scales``): Brevitas learns log2 of each threshold, rounded,
    so step 0 is the PTQ model exactly and whatever it learns writes back as powers of two."""
    from slimformer.qat.convert import learned_parameters
    from slimformer.qat.layers import is_pow2
    from slimformer.qat.writeback import snap_input_scales, to_quantized
    from slimformer.quantize.act import ActQuantizer

    lm, calib, x = digits
    qm = quantize(lm.module, QuantConfig(method="minmax", weight_bits=4, act_bits=8,
                                         calib_samples=32, power_of_two_scales=True,
                                         symmetric=symmetric), calib).model
    bm = to_brevitas(qm)
    with torch.no_grad():
        ref, got = qm(x=x), bm(x=x)
    assert torch.equal(ref, got)  # every code and scale as PTQ's
    ours_c, theirs_c = _input_codes(qm, bm, x)
    assert all(torch.equal(a, b) for a, b in zip(ours_c, theirs_c, strict=True))
    pow2 = [m for m in bm.modules() if is_pow2(m)]
    assert len(pow2) == len(qm.quant.linears) + len({id(q.act) for q in qm.quant.linears.values()})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a third of the scales one octave up: the grids move
        for name, p in learned_parameters(bm).items():
            if ".scaling_impl." in name:
                p.add_((torch.rand(p.shape, generator=gen) < 0.3).float())
    assert snap_input_scales(bm) == 0  # powers of two: our ranges hold them as they are
    ours = to_quantized(bm, qm)
    with torch.no_grad():
        s, o = bm(x=x), ours(x=x)
    assert torch.equal(s, o) and not torch.equal(s, ref)

    def is_power(t):
        return torch.equal(torch.exp2(torch.log2(t).round()), t)

    assert all(is_power(lq.wq.scale) for lq in ours.quant.linears.values())
    assert all(is_power(m.scale_zero()[0]) for m in ours.modules()
               if isinstance(m, ActQuantizer) and m.mode == "quant" and m.pow2)


class _TiedLM(torch.nn.Module):
    """Token embedding, one MLP, a head tied to the embedding table: ``ids (B, T) -> (B, T, V)``."""

    def __init__(self, vocab: int = 64, dim: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.up, self.down = torch.nn.Linear(dim, 64), torch.nn.Linear(64, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as SmolLM2's

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.down(torch.relu(self.up(self.norm(x))))
        return self.head(x)


def test_a_head_tied_to_the_embeddings_stays_ours_and_writes_back_exactly():
    """A learned copy of a tied head, written back, moved the embedding table too (SmolLM2)."""
    from slimformer.data.datasets import TensorDictDataset
    from slimformer.qat.writeback import to_quantized

    model = _TiedLM().eval()
    ids = torch.randint(0, 64, (48, 16), generator=torch.Generator().manual_seed(1))
    calib = TensorDictDataset({"ids": ids}, torch.zeros(48, dtype=torch.long))
    qm = quantize(model, QuantConfig(method="minmax", calib_samples=32, smooth="off",
                                     outlier_channels=0, calib_batch_size=8), calib).model
    assert any(lq.param[0] is qm.model.head.weight
               for lq in qm.quant.linears.values())  # the head is quantized
    bm = to_brevitas(qm)
    converted = [m for m in bm.modules() if isinstance(m, QatLinear)]
    assert len(converted) == 2 and not isinstance(bm.model.head, QatLinear)
    assert any("tied" in n for n in bm.quant.notes)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in converted:  # training moves the converted weights
            m.weight.add_(0.02 * torch.randn(m.weight.shape, generator=gen))
        s = bm(ids=ids[:8])
    ours = to_quantized(bm, qm)
    with torch.no_grad():
        o, q = ours(ids=ids[:8]), qm(ids=ids[:8])
    assert sqnr_db(s, o) >= 60 and sqnr_db(s, q) < 40
    assert torch.equal(ours.model.embed.weight, qm.model.embed.weight)


@pytest.mark.parametrize("dynamic", ["token", "tensor"])
def test_run_time_activation_ranges_convert_exactly(digits, dynamic):
    """Inputs quantized on their own range at run time: Brevitas's dynamic proxy with our rule.

    Step 0 computes the PTQ model's codes (per token: each row its own grid), nothing is learned
    for those inputs, gradients reach the weights and weight scales, and a trained student
    writes back exactly into the run-time quantizers.
    """
    from slimformer.qat.layers import is_run_time
    from slimformer.qat.writeback import to_quantized

    lm, calib, x = digits
    qm = quantize(lm.module, QuantConfig(method="minmax", weight_bits=4, act_bits=4,
                                         calib_samples=64, outlier_channels=0,
                                         act_dynamic=dynamic), calib).model
    bm = to_brevitas(qm)
    layers = [m for m in bm.modules() if isinstance(m, QatLinear)]
    assert len(layers) == len(qm.quant.linears) and all(is_run_time(m.input_quant) for m in layers)
    with torch.no_grad():
        ref, got, fl = qm(x=x), bm(x=x), lm.module(x=x)
    assert torch.equal(ref, got) and sqnr_db(fl, ref) < 40  # the same codes: the same output
    ours, theirs = _input_codes(qm, bm, x)
    assert len(ours) == len(theirs) == len(layers)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    params = learned_parameters(bm)
    assert params and all("weight_quant" in n for n in params)  # no input range is learned
    ((bm(x=x[:32]) - fl[:32]) ** 2).mean().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in layers:  # training moves the weights
            m.weight.add_(0.02 * m.weight.abs().mean() * torch.randn(m.weight.shape, generator=gen))
        s = bm(x=x)
    back = to_quantized(bm, qm)
    with torch.no_grad():
        o = back(x=x)
    assert torch.equal(s, o) and sqnr_db(s, ref) < 60  # exact, and the student had moved
    assert all(lq.act.dynamic == dynamic for lq in back.quant.linears.values())


def test_outlier_channels_stay_float_and_write_back(planted_vit):
    """Input channels our quantizer keeps float (``outlier_channels``, the W8A8 default on
    BERT-family encoders) stay float in the Brevitas layer: step 0 is the PTQ model, the float
    product trains the weight's outlier columns, and the student writes back exactly."""
    from slimformer.qat.writeback import to_quantized

    lm = planted_vit
    calib = get_dataset("fashion-mnist", "calib", limit=64)
    x = get_dataset("fashion-mnist", "test", limit=128).inputs["pixel_values"]
    qm = quantize(lm.module, QuantConfig(method="minmax", smooth="off"), calib).model
    split = {lq.name for lq in qm.quant.linears.values() if lq.act.outliers is not None}
    assert split, "the planted channel is split out"
    bm = to_brevitas(qm)
    layers = {m.site: m for m in bm.modules() if isinstance(m, QatLinear)}
    assert {s for s, m in layers.items() if m.outliers is not None} == split
    with torch.no_grad():
        ref, got, fl = qm(pixel_values=x), bm(pixel_values=x), lm.module(pixel_values=x)
    # measured: 327 dB (the same codes; the float sums in another order) vs PTQ's 36 dB
    assert sqnr_db(ref, got) >= 60 > sqnr_db(fl, ref) + 10
    with torch.no_grad():  # without the float product the planted channel is lost
        saved = {s: layers[s].outliers for s in split}
        for s in split:
            layers[s].outliers = None
        dropped = bm(pixel_values=x)
        for s in split:
            layers[s].outliers = saved[s]
    assert sqnr_db(fl, dropped) < sqnr_db(fl, ref) - 10  # measured: -8 dB
    ((bm(pixel_values=x[:32]) - fl[:32]) ** 2).mean().backward()
    for s in split:  # the outlier columns learn through the float product
        w = layers[s].weight.grad
        assert w is not None and w[:, saved[s]].abs().sum() > 0
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in layers.values():
            m.weight.add_(0.02 * m.weight.abs().mean() * torch.randn(m.weight.shape, generator=gen))
        s_out = bm(pixel_values=x)
    back = to_quantized(bm, qm)
    with torch.no_grad():
        o = back(pixel_values=x)
    assert sqnr_db(s_out, o) >= 60 and sqnr_db(s_out, ref) < 50
    assert {lq.name for lq in back.quant.linears.values() if lq.act.outliers is not None} == split
