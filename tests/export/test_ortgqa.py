"""ONNX Runtime's GroupQueryAttention in the decoder graph (export.ortgqa).

Judged against PyTorch: a tiny GPT-2 (multi-head, learned positions, Gemm projections) and a
tiny Llama (grouped-query, rotary) with left-padded rows of different lengths, whose padding
reaches the op only through the attention bias; a graph whose mask carries a float bias must
be left as it is.
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from slimformer.export.decoder import DecoderConfig, export_decoder
from slimformer.export.ortgen import OrtDecoder, generate_onnx
from slimformer.export.ortgqa import to_ort_gqa
from slimformer.models.generate import generate_tokens
from tests.tiny_lm import tiny_gpt2, tiny_llama

VOCAB = 128


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / max(((ref - got) ** 2).sum(), 1e-30)))


def test_gpt2_multi_head_attention_without_rotary_gives_pytorchs_tokens(tmp_path):
    model = tiny_gpt2(VOCAB, positions=128)
    res = export_decoder(model, tmp_path / "gpt2.onnx")
    ops = [n.op_type for n in onnx.load(str(res.path)).graph.node]
    assert res.ort_gqa == ops.count("GroupQueryAttention") == 2 and "Attention" not in ops
    assert min(m["sqnr_db"] for o in res.parity.values() for m in o.values()) > 90
    prompt = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = generate_tokens(model, prompt, 40, cache_arg="cache")
    dec = OrtDecoder(res.path, capacity=16)  # grows twice while generating
    assert dec.in_place
    assert generate_onnx(dec, prompt, 40).new_ids == ref.new_ids


def test_left_padded_rows_attend_to_their_own_tokens_only(tmp_path):
    """Rows of 9 and 5 real tokens, the shorter left-padded: each real position's logits equal
    PyTorch's with the same mask and positions; then one decode step of both rows."""
    model = tiny_llama(VOCAB, positions=128)
    res = export_decoder(model, tmp_path / "llama.onnx")
    assert res.ort_gqa == 2
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros((2, 2, 0, 16), np.float32) for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")}
    out = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                          "position_ids": pos.numpy(), **past})
    real = mask.bool().numpy()
    assert _sqnr(ref[real], out[0][real]) > 90
    nxt = torch.tensor([[3], [7]])
    mask2, pos2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), pos[:, -1:] + 1
    with torch.no_grad():
        ref2 = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask2,
                     position_ids=torch.cat([pos, pos2], 1)).logits[:, -1:].numpy()
    names = [o.name for o in sess.get_outputs()][1:]
    step = sess.run(None, {"input_ids": nxt.numpy(), "attention_mask": mask2.numpy(),
                           "position_ids": pos2.numpy(),
                           **{n.replace("present.", "past_key_values."): v
                              for n, v in zip(names, out[1:], strict=True)}})
    assert _sqnr(ref2, step[0]) > 90


def _biased_graph() -> onnx.ModelProto:
    """Attention over Concat(past, new) whose mask adds a float constant (a positional bias)."""
    b, h, t, d = 1, 2, 3, 4
    nodes = [helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=2),
             helper.make_node("Concat", ["past_key_values.0.value", "v"], ["present.0.value"],
                              axis=2),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["m", "slope"], ["bias"]),
             helper.make_node("Attention", ["q", "present.0.key", "present.0.value", "bias"],
                              ["y"])]
    f = TensorProto.FLOAT
    vi = [helper.make_tensor_value_info(n, f, [b, h, t, d]) for n in ("q", "k", "v")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [b, t]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [b, "total"]),
         *vi, *[helper.make_tensor_value_info(f"past_key_values.0.{k}", f, [b, h, "p", d])
                for k in ("key", "value")]],
        [helper.make_tensor_value_info("y", f, [b, h, t, d]),
         *[helper.make_tensor_value_info(f"present.0.{k}", f, [b, h, "total", d])
           for k in ("key", "value")]],
        [helper.make_tensor("slope", f, [], [0.5])], value_info=vi)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_a_float_bias_in_the_mask_leaves_the_graph_alone():
    proto = _biased_graph()
    before = proto.SerializeToString()
    done, why = to_ort_gqa(proto)
    assert done == 0 and "float constants" in why
    assert proto.SerializeToString() == before


def test_the_fold_form_is_still_available_and_not_in_place(tmp_path):
    model = tiny_llama(VOCAB, positions=64)
    res = export_decoder(model, tmp_path / "fold.onnx", DecoderConfig(kv_form="fold"))
    assert res.ort_gqa == 0 and not OrtDecoder(res.path).in_place


@pytest.mark.parametrize("capacity", [1, 256])
def test_in_place_capacity_does_not_change_the_tokens(tmp_path, capacity):
    model = tiny_llama(VOCAB, positions=128)
    res = export_decoder(model, tmp_path / "l.onnx", DecoderConfig(parity_steps=0))
    prompt = list(range(3, 15))
    ref = generate_tokens(model, prompt, 20, cache_arg="cache")
    assert generate_onnx(OrtDecoder(res.path, capacity=capacity), prompt, 20).new_ids == \
        ref.new_ids
