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
                                  "torch-encoder-postnorm", "timm-vit", "clip", "llama",
                                  "deberta-v2"])  # a norm's output times the attention mask
def test_reparameterization_is_exact_in_float(name):
    lm = load_model(GENERALITY[name])
    x = lm.example_inputs(4, seed=123)
    if "attention_mask" in x:  # padded rows: exact at the padded positions too
        x["attention_mask"] = x["attention_mask"].clone()
        x["attention_mask"][:2, -3:] = 0
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


def _observed(groups: list[torch.Tensor]):
    from slimformer.quantize.act import ActQuantizer

    act = ActQuantizer("site", 4, per_channel=True)
    for i, x in enumerate(groups):
        act.group = i
        act.observe(x)
    act.calibrate("minmax")
    return act


def _loss(act, x, w) -> float:
    act.mode = "quant"
    return float(((act(x) - x) @ w.t()).pow(2).mean())


def test_dual_clipping_is_kept_only_when_it_lowers_the_held_out_error():
    from slimformer.quantize.repq import learn_dual_clipping

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, generator=g)
    # heavy tails in every batch (Student-t, 3 dof): 4-bit min/max wastes its grid on them and
    # bounds learned on one batch also lower the error on the other, and on unseen rows
    torch.manual_seed(0)
    t3 = torch.distributions.StudentT(3.0)
    act = _observed([t3.sample((1024, 8)) for _ in range(2)])
    hi0 = act.hi.clone()
    test = t3.sample((4096, 8))
    before = _loss(act, test, w)
    gain = learn_dual_clipping(act, [w], 200)
    assert gain > 0.2 and (act.hi < hi0).all() and _loss(act, test, w) < 0.95 * before
    # a few large rows in each batch, of other sizes: bounds fit to one batch's cut the other's
    bulk = [torch.randn(512, 8, generator=g) for _ in range(2)]
    for b in bulk:
        b[:4] *= 4
    act = _observed(bulk)
    lo0, hi0 = act.lo.clone(), act.hi.clone()
    assert learn_dual_clipping(act, [w], 200) == 0.0
    assert torch.equal(act.lo, lo0) and torch.equal(act.hi, hi0)  # the observed range stays


def test_offset_gain_norm_fold_is_exact_in_float():
    """A norm computing ``x_hat * (1 + g) + b``: the fold goes into the effective gain."""
    from slimformer.data.datasets import TensorDictDataset
    from tests.models.test_structure_variants import (
        Block,
        OffsetLayerNorm,
        OffsetRMSNorm,
        Stack,
    )

    torch.manual_seed(0)
    model = Stack(Block(norm=OffsetLayerNorm), Block(norm=OffsetRMSNorm)).eval()
    with torch.no_grad():
        for p in model.parameters():  # trained-looking gains and shifts, not the init values
            p.add_(torch.randn_like(p) * 0.3)
    x = {"x": torch.randn(4, 16, 16) * 3}
    calib = TensorDictDataset({"x": torch.randn(16, 16, 16) * 3}, torch.zeros(16, dtype=torch.long))
    with torch.no_grad():
        ref = model(**x).double()
    cfg = QuantConfig(method="repq", weight_bits=4, act_bits=4, repq_sites="all")
    res = quantize(model, cfg, calib)
    folded = [n for n in res.notes if "folded into the norm affine" in n]
    assert len(folded) == 2 and all("(1 + w) / r - 1" in n for n in folded), res.notes
    assert sum("no bias to fold into" in n for n in res.notes) == 2  # the RMS norms
    res.model.quant.set_mode("float")
    with torch.no_grad():
        got = res.model(**x).double()
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 1e-5, f"relative error {rel:.2e}"
    # the plain fold (the stored weight divided by r, g' = g / r) would have changed the model
    ln = res.model.model.blocks[0].n1
    g0 = model.blocks[0].n1.g.detach()
    r = (1 + g0) / (1 + ln.g.detach())  # what the fold divided the effective gain by
    assert float((r - 1).abs().max()) > 0.1
    with torch.no_grad():
        ln.g.copy_(g0 / r)
        off = res.model(**x).double()
    assert float((off - ref).norm() / ref.norm()) > 1e-2


@pytest.mark.parametrize("name", ["vit", "torch-encoder-postnorm"])
def test_power_of_two_scales_keep_no_affine_on_the_quantized_branch(name):
    """Fixed-point targets: RepQ only where it folds into a norm (hls4ml cannot apply the rest)."""
    from slimformer.quantize.act import ActQuantizer

    lm = load_model(GENERALITY[name])
    cfg = dict(method="repq", weight_bits=8, act_bits=8, repq_sites="all")
    free = quantize(lm.module, QuantConfig(**cfg), _calib(lm)).model
    pow2 = quantize(lm.module, QuantConfig(**cfg, power_of_two_scales=True), _calib(lm))

    def kept(q):
        return [m.name for m in q.quant.modules()
                if isinstance(m, ActQuantizer) and getattr(m, "shift", None) is not None]

    assert kept(free)  # without power-of-two scales the MLP fc2 inputs keep an affine
    assert kept(pow2.model) == []
    folded = any("folded into the norm affine" in n for n in pow2.notes)
    assert folded == (name == "vit")  # pre-norm still folds; post-norm has nowhere to fold
