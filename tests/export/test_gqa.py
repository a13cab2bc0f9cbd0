"""Attention fed the un-repeated key/value heads (export.gqa) on small hand-built graphs.

Q has 4 heads, K/V 2 heads repeated to 4 by Unsqueeze -> Expand -> Reshape (Hugging Face's
``repeat_kv`` as traced), a causal boolean mask after a past; the rewritten graph (both modes)
is judged against the original in ONNX Runtime by SQNR, and a look-alike that mixes heads and
positions must be left alone.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from slimformer.export.gqa import unrepeat_kv

B, H, KV, T, S, D = 1, 4, 2, 3, 5, 8


def _graph(axis: int = 2) -> onnx.ModelProto:
    """Attention(Q, repeat(K), repeat(V)); ``axis``: where the repeat axis is inserted."""
    inner = [B, KV, S, D]
    inner.insert(axis, 1)
    big = list(inner)
    big[axis] = H // KV
    nodes, vi = [], []
    for x in ("k", "v"):
        nodes += [helper.make_node("Unsqueeze", [x, "axes"], [f"{x}_u"]),
                  helper.make_node("Expand", [f"{x}_u", "big"], [f"{x}_e"]),
                  helper.make_node("Reshape", [f"{x}_e", "flat"], [f"{x}_r"])]
        vi += [helper.make_tensor_value_info(f"{x}_u", TensorProto.FLOAT, inner),
               helper.make_tensor_value_info(f"{x}_e", TensorProto.FLOAT, big),
               helper.make_tensor_value_info(f"{x}_r", TensorProto.FLOAT, [B, H, S, D])]
    nodes.append(helper.make_node("Attention", ["q", "k_r", "v_r", "mask"], ["y"], scale=0.3))
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [axis]),
             helper.make_tensor("big", TensorProto.INT64, [5], big),
             helper.make_tensor("flat", TensorProto.INT64, [4], [B, H, S, D])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [B, H, T, D]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [B, KV, S, D]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [B, KV, S, D]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [B, 1, T, S])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, H, T, D])], inits,
        value_info=vi)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _run(proto, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture(scope="module")
def feeds():
    rng = np.random.default_rng(0)
    return {"q": rng.standard_normal((B, H, T, D), np.float32),
            "k": rng.standard_normal((B, KV, S, D), np.float32),
            "v": rng.standard_normal((B, KV, S, D), np.float32),
            "mask": np.tril(np.ones((T, S), bool), S - T)[None, None]}  # causal after a past


@pytest.mark.parametrize("mode", ["fold", "gqa"])
def test_repeated_kv_heads_are_fed_directly_with_equal_outputs(feeds, mode):
    before = _graph()
    ref = _run(before, feeds)
    after = onnx.ModelProto()
    after.CopyFrom(before)
    assert unrepeat_kv(after, mode) == 1
    onnx.checker.check_model(after)
    ops = [n.op_type for n in after.graph.node]  # the copies and their constants are gone
    att = after.graph.node[ops.index("Attention")]
    assert list(att.input[1:3]) == ["k", "v"] and "Expand" not in ops
    assert ops == (["Reshape", "Tile", "Attention", "Reshape"] if mode == "fold"
                   else ["Attention"])
    out = _run(after, feeds)
    sqnr = 10 * np.log10((ref ** 2).sum() / max(((ref - out) ** 2).sum(), 1e-30))
    assert sqnr > 100, sqnr


@pytest.mark.parametrize("mode", ["fold", "gqa"])
def test_a_reshape_mixing_heads_and_positions_is_left_alone(mode):
    proto = _graph(axis=3)  # (B, kv, S, rep, D) -> (B, 4, S, D): not kv head h // rep
    n = len(proto.graph.node)
    assert unrepeat_kv(proto, mode) == 0
    assert len(proto.graph.node) == n and proto.graph.node[-1].input[1] == "k_r"
