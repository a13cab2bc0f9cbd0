"""QDQ lint: each TensorRT rule fires on a graph that breaks it and not on one that keeps it."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from slimformer.export.lint import lint_qdq


def _graph(nodes, inits, opset=20):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(v, k) for k, v in
                                                inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _qdq_matmul(act_zero, w_dtype, w_zero, axis=1, consumer="MatMul", opset=20):
    inits = {"s": np.float32(0.1), "z": act_zero,
             "w": np.ones((4, 3), dtype=w_dtype), "ws": np.full(3, 0.01, np.float32),
             "wz": np.full(3, w_zero, w_dtype)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dq_w",
                              axis=axis)]
    if consumer == "MatMul":
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"))
    else:
        nodes += [helper.make_node(consumer, ["xd"], ["t"], name="other"),
                  helper.make_node("MatMul", ["t", "wd"], ["y"], name="mm")]
    return _graph(nodes, inits, opset)


def _rules(model):
    return {(f.rule, f.node) for f in lint_qdq(model)}


def test_symmetric_int8_placement_is_clean():
    assert lint_qdq(_qdq_matmul(np.int8(0), np.int8, 0)) == []


def test_asymmetric_uint8_is_rejected():
    found = _rules(_qdq_matmul(np.uint8(128), np.uint8, 7))
    assert {("TRT001", "q_x"), ("TRT002", "q_x"), ("TRT001", "dq_w"), ("TRT002", "dq_w")} <= found


def test_weight_axis_must_be_output_channel():
    assert ("TRT004", "dq_w") in _rules(_qdq_matmul(np.int8(0), np.int8, 0, axis=0))


def test_dq_feeding_non_quantizable_op():
    found = _rules(_qdq_matmul(np.int8(0), np.int8, 0, consumer="Softmax"))
    assert ("TRT007", "dq_x") in found and ("TRT006", "mm") in found


def test_quantize_without_dequantize_and_output_quantization():
    inits = {"s": np.float32(0.1), "z": np.int8(0), "w": np.ones((4, 4), np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"], name="q_out"),
             helper.make_node("Cast", ["hq"], ["y"], to=TensorProto.FLOAT, name="cast")]
    found = _rules(_graph(nodes, inits))
    assert ("TRT005", "q_out") in found and ("TRT008", "q_out") in found


def test_per_channel_activation_and_old_opset():
    inits = {"s": np.full(4, 0.1, np.float32), "z": np.zeros(4, np.int8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_x", axis=2),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq_x", axis=2)]
    found = _rules(_graph(nodes, inits, opset=12))
    assert {("TRT003", "q_x"), ("TRT003", "dq_x"), ("TRT009", "q_x")} <= found


def test_findings_serialize():
    f = lint_qdq(_qdq_matmul(np.uint8(3), np.uint8, 1))
    assert all(set(x.as_dict()) == {"rule", "severity", "node", "message"} for x in f)
    assert all(x.severity in ("error", "warning", "info") for x in f)


def test_findings_are_counted_not_listed_unless_the_target_is_tensorrt():
    from slimformer.export.lint import lint_summary

    findings = lint_qdq(_qdq_matmul(np.uint8(128), np.uint8, 128))  # ONNX Runtime's form
    errors = sum(f.severity == "error" for f in findings)
    assert errors > 0 and lint_summary(findings, "tensorrt") is None  # all listed
    line = lint_summary(findings, "ort-cpu")
    assert line.startswith(f"TensorRT QDQ lint: {len(findings)} finding(s) ({errors} error(s)")
    assert "only for a TensorRT target (this file is for ort-cpu)" in line


def test_empty_or_foreign_protobuf_is_not_an_onnx_model(tmp_path):
    import pytest

    from slimformer.errors import ExportError
    from slimformer.export.lint import load_onnx

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ExportError, match="is not an ONNX model"):
        load_onnx(empty)
    good = tmp_path / "g.onnx"
    good.write_bytes(_qdq_matmul(np.int8(0), np.int8, 0).SerializeToString())
    assert len(load_onnx(good).graph.node) == 4
