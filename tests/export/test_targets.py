"""Deployment targets: ISA detection, target -> QDQ form, metadata, slow-setting warnings, opset 23.

The form changes only how the quantized values are stored, so each form's ONNX Runtime output must
match the simulated model (output steps, argmax agreement); float exports at opset 23 (standard
``Attention``) must match PyTorch (cosine) like the opset-20 fallback.
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from slimformer.data.datasets import TensorDictDataset
from slimformer.errors import ExportError
from slimformer.export.config import OnnxConfig
from slimformer.export.onnx import export_onnx
from slimformer.export.targets import (
    config_slow_settings,
    isa_of,
    opset23_supported,
    parse_cpuinfo,
    read_metadata,
    resolve_form,
)
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu
"""


def test_isa_from_flags():
    assert isa_of("fpu avx2 avx512f avx512_vnni amx_tile amx_int8") == "amx"
    assert isa_of("avx2 avx512f avx512_vnni") == "vnni"
    assert isa_of("avx2 avx_vnni") == "vnni"  # AVX-VNNI (client cores)
    assert isa_of("sse4_2 avx avx2 fma") == "avx2"
    assert isa_of("sse4_2") == "other" and isa_of("") == "other"
    cpu = parse_cpuinfo(CPUINFO)  # first processor's lines
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8481C" and cpu.isa == "amx" and cpu.bf16
    assert "amx_int8" in cpu.line()


def test_target_to_form():
    amd_avx2 = parse_cpuinfo("model name: AMD EPYC 7B12\nflags: sse avx avx2 fma")
    f = resolve_form(OnnxConfig(target="ort-cpu", opset=20), True, cpu=amd_avx2)
    assert (f.isa, f.weights, f.activations, f.opset) == ("avx2", "narrow", "uint8", 20)
    assert f.isa_source.startswith("detected") and "AMD EPYC 7B12" in f.isa_source
    f = resolve_form(OnnxConfig(target="ort-cpu", opset=20), True, cpu=parse_cpuinfo(CPUINFO))
    assert (f.isa, f.weights, f.activations) == ("amx", "int8", "uint8")
    f = resolve_form(OnnxConfig(isa="vnni", opset=20), True)  # auto = ort-cpu, named ISA
    assert (f.target, f.isa, f.isa_source, f.weights) == ("ort-cpu", "vnni", "named", "int8")
    for target in ("openvino", "tensorrt", "portable"):
        f = resolve_form(OnnxConfig(target=target), True)
        opset = 23 if target == "openvino" and opset23_supported() else 20
        assert (f.weights, f.activations, f.opset, f.isa, f.float_attention) == \
            ("model", "model", opset, None, False)
    with pytest.raises(ExportError, match="applies to target 'ort-cpu' only"):
        resolve_form(OnnxConfig(target="openvino", isa="avx2"), True)
    f = resolve_form(OnnxConfig(target="ort-cpu"), True)  # quantized: float Attention at 23
    assert f.opset == (23 if opset23_supported() else 20) and f.float_attention == (f.opset == 23)
    f = resolve_form(OnnxConfig(target="ort-cpu", opset=20), True)  # every quantizer kept
    assert f.opset == 20 and not f.float_attention
    f = resolve_form(OnnxConfig(target="ort-cpu"), False)  # float: the standard Attention op
    assert f.opset == (23 if opset23_supported() else 20) and not f.float_attention


def test_slow_settings_of_a_quantize_config():
    # repq's default softmax (auto -> log-sqrt2) is slow on every CPU target; asymmetric weights
    # are slow in OpenVINO and not accepted by TensorRT
    ov = config_slow_settings(QuantConfig(method="repq"), OnnxConfig(target="openvino"))
    assert any(w.startswith("softmax log_sqrt2") for w in ov), ov
    assert any(w.startswith("symmetric: false") for w in ov), ov
    assert config_slow_settings(QuantConfig(softmax="uniform", symmetric=True),
                                OnnxConfig(target="openvino")) == []
    avx2 = config_slow_settings(QuantConfig(softmax="uniform"),
                                OnnxConfig(target="ort-cpu", isa="avx2", opset=20))
    assert len(avx2) == 1 and avx2[0].startswith("weight_bits 8"), avx2
    assert config_slow_settings(QuantConfig(softmax="uniform", weight_bits=7),
                                OnnxConfig(target="ort-cpu", isa="avx2", opset=20)) == []


@pytest.fixture(scope="module")
def bert():
    lm = load_model(GENERALITY["bert"])
    calib = TensorDictDataset(lm.example_inputs(16, seed=1), torch.zeros(16, dtype=torch.long))

    def q(**kw):
        return to_inference(quantize(lm.module, QuantConfig(method="repq", calib_samples=16, **kw),
                                     calib).model)

    return lm, {"asym": q(softmax="uniform"), "sym": q(softmax="uniform", symmetric=True),
                "log": q(softmax="log_sqrt2")}


def _weight_types(path) -> set[int]:
    """Element types of the constant (weight) inputs of DequantizeLinear nodes."""
    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    return {inits[n.input[0]].data_type for n in g.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and numpy_helper.to_array(inits[n.input[0]]).ndim == 2}


def _act_zero_types(path) -> set[int]:
    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant"}
    out = set()
    for n in g.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2:
            z = inits.get(n.input[2]) or consts.get(n.input[2])
            if z is not None:
                out.add(z.data_type)
    return out


def _exact(res):
    for label, p in res.parity.items():
        assert p["within_1_step"] >= 0.99 and p["argmax_agreement"] >= 0.99, (label, p)


@pytest.mark.parametrize("model,isa,weights,acts", [
    ("asym", "vnni", {TensorProto.INT8}, {TensorProto.UINT8}),
    ("asym", "avx2", {TensorProto.UINT8}, {TensorProto.UINT8}),
    ("sym", "vnni", {TensorProto.INT8}, {TensorProto.UINT8}),  # symmetric acts as uint8, zp 128
    ("sym", "avx2", {TensorProto.UINT8}, {TensorProto.UINT8}),  # no full-range int8 on AVX2
])
def test_ort_cpu_forms_store_the_same_values(bert, tmp_path, model, isa, weights, acts):
    lm, q = bert
    path = tmp_path / "q.onnx"
    res = export_onnx(q[model], path, lm.example_inputs(2), OnnxConfig(target="ort-cpu", isa=isa,
                                                                       opset=20))
    assert _weight_types(path) == weights and _act_zero_types(path) == acts
    _exact(res)
    meta = read_metadata(path)
    assert meta["target"] == "ort-cpu" and meta["isa"] == isa and meta["isa_source"] == "named"
    assert res.form["weights"] == ("int8" if isa == "vnni" else "narrow")
    assert res.summary()["form"] == res.form


def test_openvino_and_portable_keep_the_models_grids(bert, tmp_path):
    lm, q = bert
    res = export_onnx(q["sym"], tmp_path / "s.onnx", lm.example_inputs(2),
                      OnnxConfig(target="openvino", check=False))
    assert _weight_types(tmp_path / "s.onnx") == {TensorProto.INT8}
    assert _act_zero_types(tmp_path / "s.onnx") == {TensorProto.INT8}
    assert read_metadata(tmp_path / "s.onnx")["target"] == "openvino"
    assert res.opset == 20  # repq quantizes attention: its signed Q/DQ stay at opset 20
    assert not any(w.startswith("slow") for w in res.warnings), res.warnings
    res = export_onnx(q["asym"], tmp_path / "a.onnx", lm.example_inputs(2),
                      OnnxConfig(target="portable", check=False))
    assert _weight_types(tmp_path / "a.onnx") == {TensorProto.UINT8}
    assert read_metadata(tmp_path / "a.onnx")["isa"] == "None"


@pytest.mark.skipif(not opset23_supported(), reason="the installed onnx / onnxruntime do not run "
                    "the opset-23 Attention op")
def test_openvino_target_float_attention_is_the_standard_op(bert, tmp_path):
    # attention left float (min/max's default): OpenVINO gets the standard Attention op at
    # opset 23 (which it fuses), not our explicit masked softmax; same outputs in both runtimes
    lm, _ = bert
    calib = TensorDictDataset(lm.example_inputs(16, seed=1), torch.zeros(16, dtype=torch.long))
    q = to_inference(quantize(lm.module, QuantConfig(symmetric=True, calib_samples=16),
                              calib).model)
    x = lm.example_inputs(2)
    res = export_onnx(q, tmp_path / "v.onnx", x, OnnxConfig(target="openvino"))
    assert res.opset == 23 and res.ops.get("Attention", 0) > 0, (res.opset, res.ops)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "v.onnx")).graph.node}
    assert not ops & {"Softmax", "IsInf", "IsNaN"}, ops  # the attention is the one op
    assert _weight_types(tmp_path / "v.onnx") == {TensorProto.INT8}
    assert min(p["sqnr_db"] for p in res.parity.values()) >= 40, res.parity
    from slimformer.export.openvino import ov_predict
    from slimformer.export.ortrun import predict

    data = TensorDictDataset(lm.example_inputs(32, seed=3), torch.zeros(32, dtype=torch.long))
    assert (ov_predict(tmp_path / "v.onnx", data, batch_size=16) ==
            predict(tmp_path / "v.onnx", data, batch_size=16)).float().mean() >= 0.95


def test_slow_setting_warning_names_the_setting(bert, tmp_path):
    lm, q = bert
    res = export_onnx(q["log"], tmp_path / "q.onnx", lm.example_inputs(2),
                      OnnxConfig(target="ort-cpu", isa="vnni", opset=20, check=False))
    slow = [w for w in res.warnings if w.startswith("slow on target ort-cpu")]
    assert slow and "softmax log_sqrt2" in slow[0] and "softmax: uniform" in slow[0], res.warnings
    res = export_onnx(q["asym"], tmp_path / "o.onnx", lm.example_inputs(2),
                      OnnxConfig(target="openvino", check=False))
    assert any("symmetric: false" in w for w in res.warnings), res.warnings


@pytest.mark.slow
@pytest.mark.skipif(not opset23_supported(), reason="the installed onnx / onnxruntime do not run "
                    "the opset-23 Attention op")
def test_opset23_attention_parity_float_and_qdq(bert, tmp_path):
    lm, q = bert
    x = lm.example_inputs(2)
    for opset in (20, 23):
        res = export_onnx(lm.module, tmp_path / f"f{opset}.onnx", x, OnnxConfig(opset=opset))
        assert min(p["cosine"] for p in res.parity.values()) >= 0.99999, res.parity
        # ort-cpu at opset 23: ONNX Runtime's MultiHeadAttention in place of the standard op
        assert res.opset == opset and (res.ops.get("MultiHeadAttention", 0) > 0) == (opset == 23)
        assert "Attention" not in res.ops
    # quantized at opset 23 (asked for): float attention between Q/DQ'd Linears
    res = export_onnx(q["asym"], tmp_path / "q.onnx", x, OnnxConfig(target="ort-cpu", opset=23))
    assert res.opset == 23 and res.ops["MultiHeadAttention"] > 0 and res.form["float_attention"]
    _exact(res)
    n_linear = sum(lq.param[0].dim() == 2 for lq in q["asym"].quant.linears.values())
    assert res.fusion["integer_matmuls"] >= n_linear, res.fusion
    # against the simulated model (attention quantized there) it stays close
    from slimformer.export.ortrun import run_all, session
    from slimformer.export.parity import reference_outputs

    sim = reference_outputs(q["asym"], x)["logits"]
    ort = run_all(session(tmp_path / "q.onnx"), x)["logits"]
    assert np.corrcoef(sim.ravel(), ort.ravel())[0, 1] > 0.99
