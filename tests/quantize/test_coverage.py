"""Every weight matmul is quantized or listed float with its reason, and the counts add up.

``nn.MultiheadAttention`` (packed in_proj + out_proj, via ``torch.nn.TransformerEncoder``) and a
mixture-of-experts block whose experts are 3-D weights applied by indexing + ``F.linear``,
``einsum``, ``bmm`` and a per-token gather; judged against the float model by output SQNR.
"""

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from slimformer.data.datasets import TensorDictDataset
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.coverage import VECTORS


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


def _on_grid(lq) -> bool:
    """The weight the forward uses is ``(code - zero) * scale`` with integer codes in range."""
    m = lq.matrix(lq.weight())
    codes = m / lq.wq.scale + lq.wq.zero
    return bool((codes - codes.round()).abs().max() < 1e-3 and codes.min() > -1e-3
                and codes.max() < 2**lq.wq.bits - 1 + 1e-3)


def _run_with(qmodel, names, mode, x):
    """The output with the weights ``names`` switched to ``mode`` (the rest quantized)."""
    qmodel.quant.set_mode("quant")
    for lq in qmodel.quant.linears.values():
        if lq.name in names:
            lq.mode, lq._cache = mode, None
    with torch.no_grad():
        out = qmodel(**x)
    qmodel.quant.set_mode("quant")
    return out


def test_multihead_attention_projections_are_quantized():
    lm = load_model(GENERALITY["torch-encoder"])
    calib = lm.example_inputs(32, seed=0)
    res = quantize(lm.module, QuantConfig(method="minmax"), TensorDictDataset(
        calib, torch.zeros(32, dtype=torch.long)))
    mhas = [m for m in lm.module.modules() if isinstance(m, nn.MultiheadAttention)]
    packed = {n for n, p in lm.module.named_parameters() if any(
        p is m.in_proj_weight or p is m.out_proj.weight for m in mhas)}
    assert len(packed) == 2 * len(mhas) == 4
    lqs = {lq.name: lq for lq in res.model.quant.linears.values()}
    assert packed <= set(lqs)
    for name in packed:
        lq = lqs[name]
        assert not torch.equal(lq.weight(), lq.param[0]) and _on_grid(lq), name
    # counts: every 2-D weight quantized, only vectors (norms, biases) left float
    cov = res.model.quant.coverage
    total = sum(p.numel() for p in lm.module.parameters())
    mats = sum(p.numel() for p in lm.module.parameters() if p.dim() == 2)
    assert (cov.quantized, cov.total, cov.left_float) == (mats, total, {VECTORS: total - mats})
    assert any(f"weights quantized: {mats:,} of {total:,}" in n for n in res.notes)
    # the projections are applied quantized in the forward, and the model stays close to float
    x = lm.example_inputs(8, seed=7)
    with torch.no_grad():
        ref = lm.module(**x)
        out = res.model(**x)
    assert not torch.equal(out, _run_with(res.model, packed, "float", x))
    assert _sqnr(ref, out) > 25


class Experts(nn.Module):
    """Mixture-of-experts block on ``(B, T, d)`` with its experts as 3-D weights.

    ``up (E, hidden, d)`` indexed per expert and applied by ``F.linear``; ``down (E, d, hidden)``
    by one ``einsum`` over all experts; ``mix (E, d, d)`` by ``bmm`` (stored ``(in, out)``);
    ``pick (E, d, d)`` gathered per token (``pick[ids]``) then ``bmm``; ``pool (E, d, c)`` by an
    ``einsum`` that also sums over experts (two contracted axes: left float).
    """

    def __init__(self, d: int = 16, hidden: int = 32, experts: int = 4, classes: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.norm = nn.LayerNorm(d)
        self.route = nn.Linear(d, experts)
        self.up = nn.Parameter(torch.randn(experts, hidden, d, generator=g) / math.sqrt(d))
        self.down = nn.Parameter(torch.randn(experts, d, hidden, generator=g) / math.sqrt(hidden))
        self.mix = nn.Parameter(torch.randn(experts, d, d, generator=g) / math.sqrt(d))
        self.pick = nn.Parameter(torch.randn(experts, d, d, generator=g) / math.sqrt(d))
        self.pool = nn.Parameter(torch.randn(experts, d, classes, generator=g) / math.sqrt(d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, d) -> (B, classes)``."""
        b, t, d = x.shape
        e = self.up.shape[0]
        h = self.norm(x)
        gate = torch.softmax(self.route(h), -1)  # (B, T, E)
        u = torch.stack([F.gelu(F.linear(h, self.up[i])) for i in range(e)])  # (E, B, T, hid)
        y = torch.einsum("ebth,edh->ebtd", u, self.down)  # (E, B, T, d)
        h = h + (y * gate.permute(2, 0, 1).unsqueeze(-1)).sum(0)
        flat = h.reshape(1, b * t, d).expand(e, -1, -1)  # (E, B*T, d)
        h = h + torch.bmm(flat, self.mix).mean(0).reshape(b, t, d)
        ids = gate.argmax(-1).reshape(-1)  # (B*T,)
        h = h + torch.bmm(h.reshape(b * t, 1, d), self.pick[ids]).reshape(b, t, d)
        pooled = torch.einsum("btd,edc->btc", h, self.pool).mean(1)  # (B, classes)
        return self.head(h.mean(1)) + 0.1 * pooled


def test_expert_weights_are_quantized_per_expert_and_counted():
    torch.manual_seed(0)
    model = Experts().eval()
    calib = {"x": torch.randn(32, 6, 16)}
    res = quantize(model, QuantConfig(method="minmax", softmax="none"), TensorDictDataset(
        calib, torch.zeros(32, dtype=torch.long)))
    lqs = {lq.name: lq for lq in res.model.quant.linears.values()}
    experts = {"up": 32, "down": 16, "mix": 16, "pick": 16}  # output channels per expert
    for name, out in experts.items():
        lq = lqs[name]
        assert lq.wq.scale.numel() == 4 * out, name  # one scale per (expert, output channel)
        assert not torch.equal(lq.weight(), lq.param[0]) and _on_grid(lq), name
    assert lqs["mix"].axis == 1 and lqs["up"].axis == 2 and lqs["down"].axis == 2
    cov = res.model.quant.coverage
    (name, n, why), = cov.float_weights
    assert name == "pool" and "contracts 2 axes" in why
    # the counts add up to the model's matmul weights: quantized + the one listed float
    mats = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert cov.quantized + n == mats
    assert cov.quantized + sum(cov.left_float.values()) == cov.total == sum(
        p.numel() for p in model.parameters())
    # each expert weight is applied quantized in the forward; the model stays close to float
    x = {"x": torch.randn(8, 6, 16, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        ref = model(**x)
        out = res.model(**x)
    for name in experts:
        assert not torch.equal(out, _run_with(res.model, {name}, "float", x)), name
    assert _sqnr(ref, out) > 25


def test_weight_transposed_in_the_forward_is_quantized_per_output_channel():
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(12, 8) / math.sqrt(8))  # (out, in)

        def forward(self, x):
            return x @ self.w.t()  # a view of the weight, not the weight itself

    model = Probe()
    res = quantize(model, QuantConfig(method="minmax", softmax="none"), TensorDictDataset(
        {"x": torch.randn(16, 8)}, torch.zeros(16, dtype=torch.long)))
    (lq,) = res.model.quant.linears.values()
    assert not lq.transposed and lq.wq.scale.numel() == 12
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert not torch.equal(res.model(x=x), _run_with(res.model, {"w"}, "float", {"x": x}))
        assert _sqnr(model(x), res.model(x=x)) > 30
