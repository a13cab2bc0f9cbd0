"""OpenVINO's form of the decoder graph: u4 zero points, attention fused with the cache.

A tiny random Llama (hidden 96: three groups of 32 per row, so ONNX pads the packed zero points)
is exported float and weight-only INT4 with ``DecoderConfig.for_openvino()``. The graph passes
are judged by what OpenVINO's CPU plugin compiles (its runtime model) and by the outputs: equal
to the unmodified graph by SQNR, greedy tokens equal to PyTorch's.
"""

import numpy as np
import onnx
import pytest
import torch

from slimformer.errors import ExportError
from slimformer.export.decoder import KV_FORM_KEY, DecoderConfig, export_decoder
from slimformer.export.genparity import compare
from slimformer.export.ortgen import step_feeds
from tests.export.ovsteps import stateful_matches_explicit
from tests.tiny_lm import tiny_llama

ov = pytest.importorskip("openvino")

VOCAB = 128


def _prompt(n=12, seed=3) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, hidden=96, positions=128)


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """``{"float"|"int4": path}`` in OpenVINO's form, and the quantized model."""
    from slimformer.data.datasets import TensorDictDataset
    from slimformer.quantize.api import quantize
    from slimformer.quantize.config import QuantConfig

    ids = torch.randint(0, VOCAB, (16, 16), generator=torch.Generator().manual_seed(0))
    data = TensorDictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    qmodel = quantize(model, QuantConfig(weight_only=True, weight_bits=4, group_size=32,
                                         method="minmax", calib_batch_size=8), data).model
    folder = tmp_path_factory.mktemp("ov")
    cfg = DecoderConfig.for_openvino()
    paths = {k: export_decoder(m, folder / f"{k}.onnx", cfg).path
             for k, m in (("float", model), ("int4", qmodel))}
    return paths, qmodel


def _layer_types(compiled) -> list[str]:
    return [o.get_rt_info()["layerType"].astype(str)
            for o in compiled.get_runtime_model().get_ordered_ops()]


def _zero_point_types(compiled) -> set[str]:
    """Element types of the zero-point input of every compressed FullyConnected."""
    return {str(o.input_value(4).get_element_type())
            for o in compiled.get_runtime_model().get_ordered_ops()
            if o.get_rt_info()["layerType"].astype(str) == "FullyConnected"
            and o.get_input_size() > 4 and str(o.input_value(1).get_element_type()) == "<Type: 'uint4_t'>"}


def test_openvino_form_is_recorded_and_keeps_matmuls_apart(exports):
    paths, _ = exports
    for path in paths.values():
        proto = onnx.load(str(path))
        assert {p.key: p.value for p in proto.metadata_props}[KV_FORM_KEY] == "repeat"
    ops = [n.op_type for n in onnx.load(str(paths["int4"])).graph.node]
    assert "Split" not in ops and ops.count("MatMulNBits") == 2 * 7 + 1  # 7 per layer + head


def test_kv_form_metadata_names_the_form_written(model, tmp_path):
    res = export_decoder(model, tmp_path / "fold.onnx", DecoderConfig(kv_form="fold",
                                                                      check=False))
    meta = {p.key: p.value for p in onnx.load(str(res.path)).metadata_props}
    assert res.kv_unrepeated == 2 and meta[KV_FORM_KEY] == "fold"  # both layers folded
    res = export_decoder(model, tmp_path / "ort.onnx", DecoderConfig(check=False))
    meta = {p.key: p.value for p in onnx.load(str(res.path)).metadata_props}
    assert res.ort_gqa == 2 and meta[KV_FORM_KEY] == "ort-gqa"


def test_zero_points_stay_u4_and_the_outputs_equal(exports):
    """ONNX pads three groups' zero points to four: the frontend's Slice made them f32 in the
    plugin; sliced on the constant they stay u4, outputs equal (dynamic quantization off)."""
    from slimformer.export.ovgraph import compact_zero_points

    path = exports[0]["int4"]
    cfg = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    core = ov.Core()
    before, after = core.read_model(str(path)), core.read_model(str(path))
    assert compact_zero_points(after) >= 2 * 4  # q/k/v/o read the 96 inputs: 3 groups
    assert compact_zero_points(after) == 0  # nothing left to slice
    plain, compact = core.compile_model(before, "CPU", cfg), core.compile_model(after, "CPU", cfg)
    assert "<Type: 'float32'>" in _zero_point_types(plain)
    assert _zero_point_types(compact) == {"<Type: 'uint4_t'>"}
    ids = np.asarray([_prompt()], np.int64)
    past = [np.zeros((1, 2, 0, 24), np.float32) for _ in range(4)]
    names = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    feeds = step_feeds(ids, past, names)
    a, b = plain(feeds)[0], compact(feeds)[0]
    assert compare(torch.from_numpy(a), torch.from_numpy(b))["sqnr_db"] > 100


def test_attention_runs_fused_with_the_cache_and_matches_the_explicit_cache(exports, model):
    """The stateful OpenVINO form compiles each layer's attention into the plugin's
    attention-with-cache kernel (no Concat of the cache), and computes what the explicit-cache
    graph computes, step by step; greedy tokens equal PyTorch's."""
    from slimformer.export.genparity import token_parity
    from slimformer.export.openvino import OvDecoder

    path = exports[0]["float"]
    inner, outer, _, _ = stateful_matches_explicit(path, _prompt())
    kinds = _layer_types(inner.compiled)
    assert kinds.count("ScaledDotProductAttention") == 2, kinds
    assert "ScaledDotProductAttention" not in _layer_types(outer.compiled)
    assert token_parity(model, OvDecoder(path), _prompt(), 32).agreement == 1.0


def test_int4_openvino_form_generates_like_the_quantized_model(exports):
    from slimformer.export.genparity import token_parity
    from slimformer.export.openvino import OvDecoder

    paths, qmodel = exports
    dec = OvDecoder(paths["int4"])
    assert _zero_point_types(dec.compiled) == {"<Type: 'uint4_t'>"}
    assert token_parity(qmodel, dec, _prompt(), 32).agreement >= 0.95


def test_boolean_masks_become_additive(exports):
    from slimformer.export.ovgraph import float_masks

    m = ov.Core().read_model(str(exports[0]["float"]))
    sdpa = [o for o in m.get_ordered_ops() if o.get_type_name() == "ScaledDotProductAttention"]
    assert float_masks(m) == len(sdpa) == 2
    assert {str(o.input_value(3).get_element_type()) for o in sdpa} == {"<Type: 'float32'>"}


def test_make_stateful_refuses_a_graph_without_a_cache(tmp_path):
    import openvino.opset13 as ops

    from slimformer.export.ovgraph import make_stateful

    x = ops.parameter([1, 4], np.float32, name="input_ids")
    with pytest.raises(ExportError, match="not a decoder graph with a key/value cache"):
        make_stateful(ov.Model([ops.relu(x)], [x]))


def test_opset_20_graph_keeps_its_cache_without_the_reorder(model, tmp_path):
    """At opset 20 (no Attention op) there is no attention for the plugin to fuse: the cache
    variables are not reordered (a Gather would copy the cache every step); tokens exact."""
    from slimformer.export.genparity import token_parity
    from slimformer.export.openvino import OvDecoder

    res = export_decoder(model, tmp_path / "o20.onnx", DecoderConfig.for_openvino(opset=20))
    dec = OvDecoder(res.path)
    assert dec.stateful and not dec.reorder
    assert "ScaledDotProductAttention" not in _layer_types(dec.compiled)
    assert token_parity(model, dec, _prompt(), 16).agreement == 1.0


def test_gpt2_multi_head_attention_fuses_and_gives_pytorchs_tokens(tmp_path):
    """Multi-head attention (no kv copies to absorb), learned positions, Gemm projections:
    the same fused form, PyTorch's greedy tokens."""
    from slimformer.export.genparity import token_parity
    from slimformer.export.openvino import OvDecoder
    from tests.tiny_lm import tiny_gpt2

    model = tiny_gpt2(VOCAB, positions=128)
    res = export_decoder(model, tmp_path / "gpt2.onnx", DecoderConfig.for_openvino())
    dec = OvDecoder(res.path)
    assert res.opset == 23 and dec.reorder
    assert _layer_types(dec.compiled).count("ScaledDotProductAttention") == 2
    assert token_parity(model, dec, _prompt(), 32).agreement == 1.0
