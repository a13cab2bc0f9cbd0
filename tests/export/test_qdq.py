"""QDQ export of weights quantized outside plain Linears: packed attention projections and 3-D
expert weights are written as integer codes with per-channel DequantizeLinear and match the
quantized model in ONNX Runtime (parity in output steps)."""

import onnx
import torch
from onnx import numpy_helper

from slimformer.data.datasets import TensorDictDataset
from slimformer.export.onnx import export_onnx
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference
from tests.quantize.test_coverage import Experts


def _integer_initializers(path) -> dict[tuple[int, ...], int]:
    """Shape -> count of the uint8/int8 initializers of an ONNX file."""
    out: dict[tuple[int, ...], int] = {}
    for t in onnx.load(path).graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.kind in "iu" and a.itemsize == 1:
            out[a.shape] = out.get(a.shape, 0) + 1
    return out


def _check(q):
    for label in ("traced", "other"):
        p = q.parity[label]
        assert p["within_1_step"] >= 0.99 and p["argmax_agreement"] == 1.0, (label, p)


def test_expert_weights_export_as_integer_codes(tmp_path):
    torch.manual_seed(0)
    model = Experts().eval()
    calib = TensorDictDataset({"x": torch.randn(32, 6, 16)}, torch.zeros(32, dtype=torch.long))
    inf = to_inference(quantize(model, QuantConfig(method="minmax", softmax="none"), calib).model)
    q = export_onnx(inf, tmp_path / "q.onnx", {"x": torch.randn(2, 6, 16)})
    _check(q)
    codes = _integer_initializers(tmp_path / "q.onnx")
    # stored as their matrix (in, E * out): up (E, 32, 16), down (E, 16, 32), mix / pick
    # (E, 16 in, 16 out) by bmm
    assert codes.get((16, 4 * 32)) == 1 and codes.get((32, 4 * 16)) == 1
    assert codes.get((16, 4 * 16)) == 2


def test_multihead_attention_projections_export_as_integer_codes(tmp_path):
    lm = load_model(GENERALITY["torch-encoder"])
    x = lm.example_inputs(16, seed=1)
    inf = to_inference(quantize(lm.module, QuantConfig(method="minmax"), TensorDictDataset(
        x, torch.zeros(16, dtype=torch.long))).model)
    q = export_onnx(inf, tmp_path / "q.onnx", lm.example_inputs(2))
    _check(q)
    codes = _integer_initializers(tmp_path / "q.onnx")
    # 2 layers: in_proj (192, 64) and out_proj (64, 64) as (in, out) codes, beside linear1/2
    assert codes.get((64, 192)) == 2 and codes.get((64, 64)) == 2
