"""Outlier input channels kept float (massive activations split out of the quantized product).

A model with one planted massive channel after a norm (as BERT-family encoders carry): the
channel is found, the per-tensor grid then covers the rest, the output SQNR vs float rises; a
model without one keeps none; the choice survives saving, and the ONNX export computes the
same values (integer MatMul of the other channels plus a float product of the outlier's).
"""

import math

import onnx
import pytest
import torch

from slimformer.data.datasets import get_dataset
from slimformer.export.onnx import export_onnx
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.pipeline import latency_inputs
from slimformer.quantize.act import ActQuantizer
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference
from slimformer.quantize.serialize import load_quantized, save_quantized

FMNIST = ZooSpec(name="vit-fmnist")  # 128 hidden channels: at most 4 float per Linear
CHANNEL = 37


def _vit(planted: bool):
    lm = load_model(FMNIST)
    if planted:  # one massive hidden dimension after the first norm, as trained encoders have
        with torch.no_grad():
            norm = lm.module.blocks[0].norm1
            norm.weight[CHANNEL] *= 60.0
            norm.bias[CHANNEL] += 40.0
    return lm


def _sqnr(qmodel, x) -> float:
    with torch.no_grad():
        qmodel.quant.set_mode("float")
        ref = qmodel(**x).double()
        qmodel.quant.set_mode("quant")
        got = qmodel(**x).double()
    return 10 * math.log10(float((ref**2).sum() / ((got - ref) ** 2).sum()))


def _outliers(qmodel) -> dict[str, list[int]]:
    return {m.name: m.outliers.tolist() for m in qmodel.quant.modules()
            if isinstance(m, ActQuantizer) and m.outliers is not None}


@pytest.fixture(scope="module")
def data():
    return get_dataset("fashion-mnist", "calib", limit=64), get_dataset("fashion-mnist", "test",
                                                                          limit=256)


def test_a_planted_massive_channel_is_split_out(data):
    calib, test = data
    x = {"pixel_values": test.inputs["pixel_values"][:128]}
    lm = _vit(planted=True)
    # smooth off: its migration into the weights is the other remedy, judged on its own
    on = quantize(lm.module, QuantConfig(method="minmax", smooth="off"), calib)
    off = quantize(lm.module, QuantConfig(method="minmax", smooth="off", outlier_channels=0),
                   calib)
    found = _outliers(on.model)
    assert found.get("norm:blocks.0.norm1:8") == [CHANNEL], found
    assert _outliers(off.model) == {}
    assert any("outlier channels kept float" in n for n in on.notes)
    # measured: 17.7 dB without, 34.2 dB with the channel split out (held-out test rows)
    assert _sqnr(on.model, x) > _sqnr(off.model, x) + 10.0


def test_none_where_nothing_stands_out_nor_for_fixed_point(data):
    calib, _ = data
    plain = quantize(_vit(planted=False).module, QuantConfig(method="minmax", smooth="off"),
                     calib)
    assert "norm:blocks.0.norm1:8" not in _outliers(plain.model)  # the unplanted norm
    pow2 = quantize(_vit(planted=True).module,
                    QuantConfig(method="minmax", softmax="none", power_of_two_scales=True), calib)
    assert _outliers(pow2.model) == {}  # hls4ml has no float path


def test_saved_and_exported_with_the_same_values(data, tmp_path):
    calib, test = data
    x = {"pixel_values": test.inputs["pixel_values"][:64]}
    q = to_inference(quantize(_vit(planted=True).module, QuantConfig(method="minmax"),
                              calib).model)
    save_quantized(q, tmp_path / "q", FMNIST)
    again = load_quantized(tmp_path / "q")
    assert _outliers(again) == _outliers(q) != {}
    with torch.no_grad():
        assert torch.equal(again(**x), q(**x))
    res = export_onnx(q, tmp_path / "q.onnx", latency_inputs(test, 8))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert "Gather" in ops  # the outlier channel's float product
    # the export says what the float side product costs and names the faster setting
    assert any(w.startswith("outlier channels:") and "outlier_channels: 0" in w
               for w in res.warnings), res.warnings
    # every Linear still an integer matmul in ONNX Runtime (the float product is a small MatMul)
    plain = [lq for lq in q.quant.linears.values() if lq.param[0].dim() == 2]  # not the conv
    assert res.fusion["integer_matmuls"] >= len(plain)
    for p in res.parity.values():
        assert p["sqnr_db"] > 45 and p["argmax_agreement"] == 1


def test_qat_keeps_the_split_channels(data):
    """The Brevitas layers of QAT keep the same channels float (tests/qat: training, export)."""
    from slimformer.qat.convert import to_brevitas
    from slimformer.qat.layers import QatLinear

    calib, test = data
    x = {"pixel_values": test.inputs["pixel_values"][:64]}
    q = quantize(_vit(planted=True).module, QuantConfig(method="minmax", weight_bits=4,
                                                           act_bits=8), calib).model
    ours = {lq.name: lq.act.outliers.tolist() for lq in q.quant.linears.values()
            if lq.act.outliers is not None}
    bm = to_brevitas(q)
    theirs = {m.site: m.outliers.tolist() for m in bm.modules()
              if isinstance(m, QatLinear) and m.outliers is not None}
    assert ours and theirs == ours
    with torch.no_grad():
        ref, got = q(**x).double(), bm(**x).double()
    assert 10 * math.log10(float((ref**2).sum() / ((got - ref) ** 2).sum().clamp_min(1e-30))) > 60


@pytest.mark.parametrize("dyn", ["token", "tensor"])
def test_run_time_ranges_leave_the_outliers_out_in_onnx_runtime_too(data, tmp_path, dyn):
    calib, test = data
    x = {"pixel_values": test.inputs["pixel_values"][:64]}
    cfg = dict(act_dynamic=dyn, smooth="off")
    on = to_inference(quantize(_vit(planted=True).module, QuantConfig(**cfg), calib).model)
    off = quantize(_vit(planted=True).module, QuantConfig(**cfg, outlier_channels=0), calib)
    assert _outliers(on).get("norm:blocks.0.norm1:8") == [CHANNEL]
    assert _sqnr(on, x) > _sqnr(off.model, x) + 3.0  # measured token: 30.9 -> 34.6 dB
    res = export_onnx(on, tmp_path / "q.onnx", latency_inputs(test, 8))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    plain = [lq for lq in on.quant.linears.values() if lq.param[0].dim() == 2]  # not the conv
    assert ops.count("MatMulInteger") == len(plain) and "Gather" in ops
    for p in res.parity.values():
        assert p["sqnr_db"] > 45 and p["argmax_agreement"] == 1
