"""ONNX Runtime's MultiHeadAttention in place of the opset-23 Attention (export/ortmha.py)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimformer.export.config import OnnxConfig
from slimformer.export.onnx import export_onnx
from slimformer.export.ortmha import to_ort_mha
from slimformer.export.ortrun import run_all, session
from slimformer.export.targets import opset23_supported
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model

pytestmark = pytest.mark.skipif(not opset23_supported(), reason="the installed onnx / "
                                "onnxruntime do not run the opset-23 Attention op")


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    err = float(((ref - got) ** 2).sum())
    return float("inf") if err == 0 else 10 * np.log10(float((ref ** 2).sum()) / err)


def _graph(mask_shape, mask_type, causal=0, bias=False):
    """Q3/K3/V3 (B, S, 8) (+ a bias each) viewed as 2 heads of 4, the opset-23 Attention, back."""
    b, s, h, d = "B", "S", 2, 4
    nodes, vi, inits = [], [], []
    for i, x in enumerate("qkv"):
        src = x
        if bias:
            inits.append(numpy_helper.from_array(np.linspace(-1, 1, h * d, dtype=np.float32) *
                                                 (i + 1), f"b{x}"))
            nodes.append(helper.make_node("Add", [x, f"b{x}"], [f"{x}_b"]))
            vi.append(helper.make_tensor_value_info(f"{x}_b", TensorProto.FLOAT, [b, s, h * d]))
            src = f"{x}_b"
        nodes += [helper.make_node("Reshape", [src, "shape4"], [f"{x}_r"]),
                  helper.make_node("Transpose", [f"{x}_r"], [f"{x}4"], perm=[0, 2, 1, 3])]
        vi.append(helper.make_tensor_value_info(f"{x}4", TensorProto.FLOAT, [b, h, s, d]))
    nodes += [helper.make_node("Attention", ["q4", "k4", "v4", "mask"], ["y4"], scale=0.4,
                               is_causal=causal),
              helper.make_node("Transpose", ["y4"], ["y_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["y_t", "shape3"], ["y"])]
    vi += [helper.make_tensor_value_info("y4", TensorProto.FLOAT, [b, h, s, d]),
           helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, s, h * d])]
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [b, s, h * d]) for x in "qkv"]
    inputs.append(helper.make_tensor_value_info("mask", mask_type, mask_shape))
    g = helper.make_graph(nodes, "att", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, s, h * d])],
                          [numpy_helper.from_array(np.array([0, 0, h, d], np.int64), "shape4"),
                           numpy_helper.from_array(np.array([0, 0, h * d], np.int64), "shape3"),
                           *inits],
                          value_info=vi)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


def _ort(proto, feeds):
    import onnxruntime as ort

    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


@pytest.mark.parametrize("mask_shape,mask_type", [
    (["B", 1, "S", "S"], TensorProto.BOOL),  # what torch.onnx writes for a padding mask
    ([1, 1, "S", "S"], TensorProto.BOOL),  # one mask for every row and head
    (["B", 2, "S", "S"], TensorProto.FLOAT),  # an additive per-head float bias
])
def test_rewrite_matches_the_standard_op(mask_shape, mask_type):
    rng = np.random.default_rng(0)
    proto = _graph(mask_shape, mask_type)
    bsz, s = 3, 5
    feeds = {x: rng.normal(size=(bsz, s, 8)).astype(np.float32) for x in "qkv"}
    shape = [bsz if d == "B" else s if d == "S" else d for d in mask_shape]
    if mask_type == TensorProto.BOOL:
        keep = np.ones(shape, bool)
        keep[0, ..., 3:] = False  # two masked keys
        feeds["mask"] = keep
    else:
        feeds["mask"] = rng.normal(size=shape).astype(np.float32)
    before = _ort(proto, feeds)
    assert to_ort_mha(proto) == 1
    ops = [n.op_type for n in proto.graph.node]
    assert "Attention" not in ops and "Transpose" not in ops and ops.count("MultiHeadAttention") == 1
    assert _sqnr(before, _ort(proto, feeds)) > 100


def test_projection_biases_fold_into_the_op():
    rng = np.random.default_rng(1)
    proto = _graph(["B", 1, "S", "S"], TensorProto.BOOL, bias=True)
    feeds = {x: rng.normal(size=(2, 6, 8)).astype(np.float32) for x in "qkv"}
    feeds["mask"] = np.ones((2, 1, 6, 6), bool)
    before = _ort(proto, feeds)
    assert to_ort_mha(proto) == 1
    assert "Add" not in [n.op_type for n in proto.graph.node]
    mha = next(n for n in proto.graph.node if n.op_type == "MultiHeadAttention")
    assert mha.input[3]  # the concatenated (3 * 8,) bias
    assert _sqnr(before, _ort(proto, feeds)) > 100


def test_causal_attention_is_left_alone():
    proto = _graph(["B", 1, "S", "S"], TensorProto.BOOL, causal=1)
    assert to_ort_mha(proto) == 0
    assert [n.op_type for n in proto.graph.node].count("Attention") == 1


@pytest.mark.slow
def test_float_export_is_read_by_quantize_dynamic_with_its_defaults(tmp_path):
    """The ort-cpu float file: MultiHeadAttention, PyTorch parity, and ORT's own quantizer."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    lm = load_model(GENERALITY["bert"])
    x = lm.example_inputs(4)
    res = export_onnx(lm.module, tmp_path / "f.onnx", x, OnnxConfig(target="ort-cpu"))
    assert res.opset == 23 and res.ops.get("MultiHeadAttention", 0) > 0, res.ops
    assert min(p["cosine"] for p in res.parity.values()) >= 0.99999, res.parity
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "d.onnx"),
                     weight_type=QuantType.QInt8, per_channel=True)  # defaults: Attention too
    ops = {n.op_type for n in onnx.load(str(tmp_path / "d.onnx")).graph.node}
    assert "QAttention" not in ops and "DynamicQuantizeLinear" in ops, ops
    ref = run_all(session(tmp_path / "f.onnx"), x)
    got = run_all(session(tmp_path / "d.onnx"), x)
    for name in ref:
        assert _sqnr(ref[name], got[name]) > 15, name  # int8 weights and activations
