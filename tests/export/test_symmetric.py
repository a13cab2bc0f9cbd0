"""Symmetric quantization exports int8 Q/DQ with zero point 0: TensorRT-clean (lint) and equal to
the simulated model in ONNX Runtime.

ONNX Runtime's fused int8 x int8 kernel (MatMulIntegerToFloat, S8S8) saturates on x86 CPUs
without VNNI (AVX2 ``vpmaddubsw`` pair sums overflow int16 for weights beyond +-64); where a probe
shows this, the parity checks run the same graph with ONNX Runtime's QDQ fusion off.
"""

import functools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from slimformer.data.datasets import TensorDictDataset, get_dataset
from slimformer.export import ortrun
from slimformer.export.config import OnnxConfig
from slimformer.export.lint import lint_qdq
from slimformer.export.onnx import export_onnx
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.pipeline import evaluate_model, latency_inputs
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference

TRT_ERRORS = {"TRT001", "TRT002", "TRT003"}
TRT = OnnxConfig(target="tensorrt")  # the int8 zero-point-0 form (ort-cpu writes uint8 acts)


@functools.cache
def _fused_s8s8_saturates() -> bool:
    """Whether ONNX Runtime's fused int8 MatMul is wrong here (full-range int8 weights)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 127, (64, 8)).astype(np.float32)
    w = rng.integers(-127, 128, (8, 16)).astype(np.int8)
    inits = [numpy_helper.from_array(np.float32(1.0), "s"), numpy_helper.from_array(np.int8(0), "z"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(16, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(16, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [64, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    return not np.array_equal(y, np.round(x) @ w.astype(np.float32))


@pytest.fixture
def ort_exact(monkeypatch):
    """ONNX Runtime sessions that compute the graph as written (QDQ fusion off where it saturates)."""
    import onnxruntime as ort

    if not _fused_s8s8_saturates():
        return
    original = ort.InferenceSession

    def unfused(path, so=None, **kw):
        so = so or ort.SessionOptions()
        so.add_session_config_entry("session.disable_quant_qdq", "1")
        return original(path, so, **kw)

    monkeypatch.setattr(ort, "InferenceSession", unfused)


def _int8_only(path) -> None:
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            assert inits[n.input[0]].data_type == TensorProto.INT8, n.name


@pytest.mark.slow
def test_symmetric_export_is_trt_clean_and_matches_simulation(tmp_path, ort_exact):
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    calib, test = get_dataset(lm.dataset, "calib"), get_dataset(lm.dataset, "test")
    cfg = QuantConfig(method="repq", symmetric=True, softmax="uniform")
    inf = to_inference(quantize(lm.module, cfg, calib).model)
    res = export_onnx(inf, tmp_path / "q.onnx", latency_inputs(test, 16), TRT)
    found = lint_qdq(onnx.load(tmp_path / "q.onnx"))
    assert not [f for f in found if f.rule in TRT_ERRORS], found
    _int8_only(tmp_path / "q.onnx")
    assert res.fusion["integer_matmuls"] >= 1 or _fused_s8s8_saturates()
    sim, _ = evaluate_model(inf, test)
    ort_preds = ortrun.predict(tmp_path / "q.onnx", test)
    agree = float((sim == ort_preds).float().mean())
    assert agree >= 0.99, f"ONNX Runtime vs simulated argmax agreement {agree:.4f}"
    for p in res.parity.values():
        assert p["within_1_step"] >= 0.95, res.parity


@pytest.mark.slow
def test_symmetric_export_of_a_text_model_with_embeddings(tmp_path, ort_exact):
    lm = load_model(GENERALITY["bert"])
    x = lm.example_inputs(16, seed=1)
    calib = TensorDictDataset(x, torch.zeros(16, dtype=torch.long))
    cfg = QuantConfig(method="repq", symmetric=True, softmax="uniform", calib_samples=16,
                      embedding_bits=8, act_bits=6)
    inf = to_inference(quantize(lm.module, cfg, calib).model)
    res = export_onnx(inf, tmp_path / "q.onnx", lm.example_inputs(4, seed=2), TRT)
    found = lint_qdq(onnx.load(tmp_path / "q.onnx"))
    assert not [f for f in found if f.rule in TRT_ERRORS], found
    _int8_only(tmp_path / "q.onnx")
    for p in res.parity.values():
        assert p["within_1_step"] >= 0.95 and p["cosine"] >= 0.999, res.parity
