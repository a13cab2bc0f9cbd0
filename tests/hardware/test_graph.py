"""Lowering to hls4ml operations: exact in float, typed errors listing unsupported modules."""

import pytest
import torch
from torch import nn

from slimformer.data.datasets import get_dataset
from slimformer.errors import HardwareError
from slimformer.hardware.config import HlsConfig
from slimformer.hardware.graph import run_float
from slimformer.hardware.lowering import lower
from slimformer.hardware.precision import assign
from slimformer.models.zoo import load_zoo_model
from slimformer.quantize import QuantConfig, quantize


@pytest.fixture(scope="module")
def digits():
    return load_zoo_model("vit-digits-seq").eval(), get_dataset("digits-seq", "calib")


def test_lowered_graph_matches_the_model_in_float(digits):
    model, calib = digits
    x = calib.inputs["x"][:64]
    g = lower(model, {"x": x[:1]})
    kinds = [o.kind for o in g.ops]
    assert kinds.count("einsum") == 4 and kinds.count("softmax") == 2 and "mean" in kinds
    # the 1/sqrt(d) score scale went into the softmax's exp table
    assert "scale" not in kinds
    assert all(o.attrs["exp_scale"] == pytest.approx(8**-0.5) for o in g.ops if o.kind == "softmax")
    sm = next(o for o in g.ops if o.kind == "softmax")
    assert (sm.attrs["n_outer"], sm.attrs["n_inner"]) == (16, 1)  # per row of (H, T, T)
    with torch.no_grad():
        ref = model(x).double()
    got = run_float(g, {"x": x})[g.outputs[0]]
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()


class _Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.GELU()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.act(self.fc(x))
        return self.attn(h, h, h)[0] + torch.sigmoid(h)


def test_unsupported_ops_are_listed_by_module_path():
    with pytest.raises(HardwareError) as e:
        lower(_Gelu().eval(), {"x": torch.randn(1, 4, 8)})
    msg = str(e.value)
    assert "act (GELU)" in msg and "attn (MultiheadAttention)" in msg and "sigmoid" in msg
    assert "supported:" in msg and "nn.LayerNorm" in msg  # the supported set is named


def test_weight_and_activation_types_are_exact_with_power_of_two_scales(digits):
    model, calib = digits
    cfg = QuantConfig(method="minmax", weight_bits=6, act_bits=8, softmax="none",
                      power_of_two_scales=True, calib_samples=64)
    q = quantize(model, cfg, calib).model
    g = lower(q.model, {"x": calib.inputs["x"][:1]})
    prec = assign(g, q, {"x": calib.inputs["x"][:64]}, HlsConfig())
    from slimformer.quantize.state import key_of

    for op in (o for o in g.ops if o.kind == "dense"):
        lq = q.quant.linears[key_of(op.attrs["weight_name"])]
        w = lq.quantized_matrix().detach().double()
        assert torch.equal(prec.fixed[op.name]["weight"].quantize(w), w)  # exact
        assert torch.equal(prec.weights[op.name], w)
        # the Linear's input type is exactly its activation quantizer's grid
        s, z = (float(v) for v in lq.act.scale_zero())
        t = prec.result(op.inputs[0])
        grid = (torch.arange(256, dtype=torch.float64) - z) * s
        assert torch.equal(t.quantize(grid), grid) and t.width <= 9
        assert prec.source[op.name + ":weight"].startswith("exact")


def test_non_power_of_two_scales_are_refused_with_the_fix(digits):
    model, calib = digits
    q = quantize(model, QuantConfig(method="minmax", softmax="none", calib_samples=32),
                 calib).model
    g = lower(q.model, {"x": calib.inputs["x"][:1]})
    with pytest.raises(HardwareError, match="power_of_two_scales"):
        assign(g, q, {"x": calib.inputs["x"][:32]}, HlsConfig())


def test_run_time_activation_ranges_are_refused_with_the_fix(digits):
    model, calib = digits
    q = quantize(model, QuantConfig(method="minmax", weight_bits=4, act_bits=4, act_dynamic="token",
                                    outlier_channels=0, calib_samples=32), calib).model
    g = lower(q.model, {"x": calib.inputs["x"][:1]})
    with pytest.raises(HardwareError, match=r"run time \(act_dynamic token.*power_of_two_scales"):
        assign(g, q, {"x": calib.inputs["x"][:32]}, HlsConfig())


def test_log_softmax_codes_are_refused(digits):
    model, calib = digits
    q = quantize(model, QuantConfig(method="minmax", softmax="log2", power_of_two_scales=True,
                                    calib_samples=32), calib).model
    g = lower(q.model, {"x": calib.inputs["x"][:1]})
    with pytest.raises(HardwareError, match="softmax: uniform .* or none"):
        assign(g, q, {"x": calib.inputs["x"][:32]}, HlsConfig())


class _MatmulAttention(nn.Module):
    """Post-norm block with ``q @ k^T`` attention written with permute / transpose."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4)

    def forward(self, x):  # (B, T, dim)
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.h, self.d).permute(0, 2, 1, 3)  # (B, H, T, D)
        k = self.k(x).view(b, t, self.h, self.d).permute(0, 2, 1, 3)
        v = self.v(x).view(b, t, self.h, self.d).permute(0, 2, 1, 3)
        p = torch.softmax(q @ k.transpose(-2, -1) / self.d**0.5, dim=-1)
        a = (p @ v).transpose(1, 2).reshape(b, t, c)
        h = self.norm(x + self.o(a))
        return self.fc(h.mean(1))


def test_matmul_attention_lowers_to_einsums_without_transposes():
    torch.manual_seed(0)
    model = _MatmulAttention().eval()
    x = torch.randn(16, 6, 8)
    g = lower(model, {"x": x[:1]})
    kinds = [o.kind for o in g.ops]
    assert "transpose" not in kinds and kinds.count("einsum") == 2
    with torch.no_grad():
        ref = model(x).double()
    assert (run_float(g, {"x": x})[g.outputs[0]] - ref).abs().max() < 1e-5
    # the fixed-point reference of the float model stays close (types from ranges)
    from slimformer.hardware.reference import reference_outputs

    prec = assign(g, None, {"x": x}, HlsConfig())
    got = reference_outputs(g, prec, {"x": x}, 1024)[g.outputs[0]]
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_vit_fmnist_is_refused_with_every_unsupported_module():
    model = load_zoo_model("vit-fmnist").eval()
    with pytest.raises(HardwareError) as e:
        lower(model, {"pixel_values": torch.randn(1, 1, 28, 28)})
    msg = str(e.value)
    assert "patch (Conv2d)" in msg and "blocks.0.mlp.act (GELU)" in msg
    assert "blocks.5.mlp.act (GELU)" in msg  # every occurrence, not just the first


def test_gelu_substitution_is_explicit_and_close():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    x = torch.randn(32, 5, 8) * 2
    with pytest.raises(HardwareError, match=r"(?s)1 \(GELU\).*gelu: sigmoid"):
        lower(model, {"input": x[:1]})  # refused by default, the option named
    g = lower(model, {"input": x[:1]}, gelu="sigmoid")
    assert [o.kind for o in g.ops if o.module == "1"] == ["scale", "sigmoid", "mul"]
    with torch.no_grad():
        ref = model(x).double()
    err = (run_float(g, {"input": x})[g.outputs[0]] - ref).abs().max()
    assert 0 < err < 0.02 * float(model[2].weight.abs().sum(1).max())  # the approximation
