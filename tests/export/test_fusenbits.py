"""MatMulNBits ops reading one input merged into one op and a Split (export.fusenbits).

Random 4-bit codes, scales and zero points on a hand-built graph: three ops reading X with one
block size (one without zero points) merge; one with another block size and one reading
another input stay. ONNX Runtime's outputs before and after must be equal to the bit, at
accuracy level 0 and 4.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimformer.export.fusenbits import fuse_shared_inputs

K = 64


def _graph(level: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for name, n, block, x, zp in (("a", 48, 32, "x", True), ("b", 16, 32, "x", False),
                                  ("c", 32, 32, "x", True), ("d", 8, 16, "x", True),
                                  ("e", 8, 32, "x2", True)):
        blocks = K // block
        ins = [x, f"{name}_B", f"{name}_s"]
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block // 2),
                                                       dtype=np.uint8), f"{name}_B"),
                  numpy_helper.from_array(rng.uniform(0.01, 0.1, (n, blocks))
                                          .astype(np.float32), f"{name}_s")]
        if zp:
            inits.append(numpy_helper.from_array(
                rng.integers(0, 256, (n, -(-blocks // 2)), dtype=np.uint8), f"{name}_z"))
            ins.append(f"{name}_z")
        nodes.append(helper.make_node("MatMulNBits", ins, [name], domain="com.microsoft", K=K,
                                      N=n, bits=4, block_size=block, accuracy_level=level))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 5, n]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, 5, K])
                     for x in ("x", "x2")], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _run(proto, feeds):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("level", [0, 4])
def test_ops_sharing_an_input_merge_and_compute_the_same_bits(level):
    rng = np.random.default_rng(1)
    feeds = {x: rng.standard_normal((2, 5, K)).astype(np.float32) for x in ("x", "x2")}
    proto = _graph(level)
    ref = _run(proto, feeds)
    assert fuse_shared_inputs(proto.graph) == 1
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 3 and ops.count("Split") == 1
    fused = next(n for n in proto.graph.node if n.name.endswith("_fused"))
    assert {a.name: helper.get_attribute_value(a) for a in fused.attribute}["N"] == 96
    assert {t.name for t in proto.graph.initializer}.isdisjoint({"a_B", "b_s", "c_z"})
    for r, g in zip(ref, _run(proto, feeds), strict=True):
        assert np.array_equal(r, g)


def test_nothing_to_merge_leaves_the_graph_alone():
    proto = _graph(0)
    keep = [n for n in proto.graph.node if n.output[0] in ("a", "d", "e")]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    before = proto.SerializeToString()
    assert fuse_shared_inputs(proto.graph) == 0 and proto.SerializeToString() == before
