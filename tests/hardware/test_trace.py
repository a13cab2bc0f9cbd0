"""trace_ops writes torch's operations (matmul, gelu); the rewrite passes are exact in float64."""

import torch
from torch import nn

from slimformer.hardware.graph import run_float
from slimformer.hardware.lowering import lower
from slimformer.hardware.trace import trace_ops


def _sigmoid_gelu(z):
    return z * torch.sigmoid(1.702 * z)


class _Block(nn.Module):
    """``softmax(q @ k^T / sqrt(d)) @ v`` with transposes, then a GELU MLP (B, T, 8) -> (B, 4).

    ``approx``: GELU written as ``x * sigmoid(1.702 x)`` (the float reference of the lowering).
    """

    def __init__(self, dim=8, heads=2, approx=False):
        super().__init__()
        self.h, self.d, self.approx = heads, dim // heads, approx
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.fc, self.act, self.out = nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, 4)

    def forward(self, x):  # (B, T, dim)
        b, t, c = x.shape
        q, k, v = (m(x).view(b, t, self.h, self.d).transpose(1, 2) for m in (self.q, self.k, self.v))
        p = torch.softmax(q @ k.transpose(-2, -1) / self.d**0.5, dim=-1)  # (B, H, T, T)
        a = (p @ v).transpose(1, 2).reshape(b, t, c)  # (B, T, dim)
        h = self.fc(x + a)
        h = _sigmoid_gelu(_sigmoid_gelu(h)) if self.approx else nn.functional.gelu(self.act(h))
        return self.out(h).mean(1)


def test_trace_keeps_torch_ops_and_the_passes_rewrite_them_exactly():
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(16, 5, 8)
    traced = trace_ops(model, {"x": x[:1]}, gelu="sigmoid")
    lowered = lower(model, {"x": x[:1]}, gelu="sigmoid")
    tk, lk = [o.kind for o in traced.ops], [o.kind for o in lowered.ops]
    assert tk.count("matmul") == 2 and tk.count("gelu") == 2 and "transpose" in tk
    assert not {"matmul", "gelu", "transpose"} & set(lk) and lk.count("einsum") == 2
    assert lk.count("sigmoid") == 2 and lk.count("scale") == 2  # only GELU's 1.702 x remain
    a = run_float(traced, {"x": x})[traced.outputs[0]]
    b = run_float(lowered, {"x": x})[lowered.outputs[0]]
    assert (a - b).abs().max() <= 1e-12 * a.abs().max()  # float64: rounding only
    ref_model = _Block(approx=True).eval()
    ref_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = ref_model(x).double()
    assert (b - ref).abs().max() < 1e-5 * ref.abs().max()  # the model, GELU in sigmoid form


def test_public_lower_is_the_function_whatever_was_imported_first():
    import slimformer.hardware as hw
    import slimformer.hardware.lowering
    import slimformer.hardware.trace

    assert hw.lower is slimformer.hardware.lowering.lower  # no submodule of that name shadows it
    assert hw.SUPPORTED is slimformer.hardware.trace.SUPPORTED
