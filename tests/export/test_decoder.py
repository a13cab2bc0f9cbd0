"""Decoder export with a key/value cache, generation through ONNX Runtime, MatMulNBits.

A tiny random Llama (hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 128) is exported once as a
float decoder graph and once weight-only INT4 (groups of 32) with MatMulNBits; ONNX Runtime's
outputs are judged against PyTorch by SQNR and greedy-token agreement.
"""

import numpy as np
import onnx
import pytest
import torch

from slimformer.errors import ConfigError, ExportError
from slimformer.export.decoder import DecoderConfig, cache_layout, export_decoder
from slimformer.export.ortgen import OrtDecoder, generate_onnx
from slimformer.models.generate import generate_tokens
from tests.tiny_lm import tiny_llama

VOCAB = 128


def _llama():
    return tiny_llama(VOCAB, positions=128)


def _prompt(n=12, seed=3) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model():
    return _llama()


@pytest.fixture(scope="module")
def float_export(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("dec") / "float.onnx"
    return export_decoder(model, path), path


def test_layout_is_read_from_the_cache(model):
    lay = cache_layout(model)
    assert (lay.layers, lay.kv_heads, lay.head_dim, lay.vocab) == (2, 2, 16, VOCAB)


def test_graph_inputs_outputs_and_symbolic_axes(float_export):
    res, path = float_export
    proto = onnx.load(str(path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]}
    assert [i.name for i in proto.graph.input][:3] == ["input_ids", "attention_mask",
                                                       "position_ids"]
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    for i in range(2):  # grouped-query attention kept: 2 kv heads, not 4
        assert dims[f"past_key_values.{i}.key"] == ["batch", 2, "past_sequence", 16]
        assert dims[f"present.{i}.value"][:2] == ["batch", 2]
    assert dims["logits"] == ["batch", "sequence", VOCAB]
    assert res.opset in (20, 23) and res.size_bytes == path.stat().st_size


def test_attention_is_ort_group_query_attention_reading_the_cache(float_export, int4_export):
    """The default form: one GroupQueryAttention per layer reads the past and writes the
    present itself (no Concat of the cache, no copies of the kv heads)."""
    for res, path in (float_export, int4_export[1:]):
        proto = onnx.load(str(path))
        if res.opset < 23:  # no Attention op: nothing to rewrite
            continue
        gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
        assert res.ort_gqa == len(gqa) == 2 and res.kv_unrepeated == 2
        assert not [n for n in proto.graph.node if n.op_type in ("Attention", "Expand")
                    and any(o.startswith("present.") for o in n.input)]
        for i, n in enumerate(gqa):
            assert list(n.input[3:5]) == [f"past_key_values.{i}.key",
                                          f"past_key_values.{i}.value"]
            assert list(n.output[1:]) == [f"present.{i}.key", f"present.{i}.value"]
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["slimformer.kv_cache"] == "in-place"


def test_fold_form_feeds_attention_the_cache_kv_heads_without_copies(model, tmp_path):
    res = export_decoder(model, tmp_path / "fold.onnx", DecoderConfig(kv_form="fold"))
    proto = onnx.load(str(res.path))
    att = [n for n in proto.graph.node if n.op_type == "Attention"]
    assert res.kv_unrepeated == len(att) == 2 and res.ort_gqa == 0
    assert res.tokens["agreement"] == 1.0
    for i, n in enumerate(att):  # K/V: the presents, (batch, 2 kv heads, total, 16)
        assert list(n.input[1:3]) == [f"present.{i}.key", f"present.{i}.value"]
    assert not [n for n in proto.graph.node if n.op_type == "Expand"
                and any(o.startswith("present.") for o in n.input)]


def test_the_ops_own_grouped_attention_and_the_kept_copies_match_pytorch(model, tmp_path):
    for form in ("gqa", "repeat"):  # the export's own checks: SQNR and 32 greedy tokens
        res = export_decoder(model, tmp_path / f"{form}.onnx", DecoderConfig(kv_form=form))
        assert res.tokens["agreement"] == 1.0 and res.kv_unrepeated == (form == "gqa") * 2
        assert min(m["sqnr_db"] for o in res.parity.values() for m in o.values()) > 90
        ops = [n.op_type for n in onnx.load(str(res.path)).graph.node]
        assert ("Tile" in ops, ops.count("Expand") > 3) == (False, form == "repeat")


def test_last_logits_graph_gives_the_last_position_and_the_same_tokens(model, float_export,
                                                                      tmp_path):
    res = export_decoder(model, tmp_path / "last.onnx", DecoderConfig(last_logits=True))
    assert res.tokens["agreement"] == 1.0  # 32 greedy steps equal PyTorch's
    full, last = (OrtDecoder(p, in_place=False) for p in (float_export[1], res.path))
    ids = np.asarray([_prompt()])
    (lf, pf), (ll, pl) = full.step(ids, full.empty()), last.step(ids, last.empty())
    assert lf.shape == (1, 12, VOCAB) and ll.shape == (1, 1, VOCAB)
    for ref, got in ((lf[:, -1:], ll), *zip(pf, pl, strict=True)):
        assert 10 * np.log10((ref ** 2).sum() / max(((ref - got) ** 2).sum(), 1e-30)) > 90


def test_float_prefill_and_decode_match_pytorch(float_export):
    res, _ = float_export
    assert set(res.parity) == {"prefill", "decode"}
    for outs in res.parity.values():
        assert len(outs) == 5  # logits + 2 layers x key/value
        assert min(m["sqnr_db"] for m in outs.values()) > 90, outs
        assert max(m["max_rel_error"] for m in outs.values()) < 1e-4


def test_float_greedy_tokens_equal_pytorch_for_32_steps(model, float_export):
    _, path = float_export
    prompt = _prompt()
    ref = generate_tokens(model, prompt, 32, cache_arg="cache")
    got = generate_onnx(OrtDecoder(path), prompt, 32)
    assert got.new_ids == ref.new_ids and len(got.new_ids) == 32
    assert got.prefill_tokens_per_s > 0 and got.decode_tokens_per_s > 0


def test_float_export_records_equal_greedy_tokens(float_export):
    """The export itself compared 32 greedy tokens with PyTorch's (teacher-forced)."""
    res, _ = float_export
    assert res.tokens == {"steps": 32, "prompt_tokens": 8, "agreement": 1.0,
                          "first_difference": None, "min_margin": None}


def test_token_parity_sees_a_different_model(model, int4_export):
    """The INT4 graph against the float model: the metric falls below 1 (it can fail)."""
    from slimformer.export.genparity import token_parity

    tp = token_parity(model, OrtDecoder(int4_export[2]), _prompt(), 32)
    assert tp.agreement < 1.0 and tp.first_difference is not None and tp.min_margin >= 0


def test_batch_and_past_lengths_are_dynamic(model, float_export):
    """Two rows, a 5-token past then 3 new tokens: the logits equal the full-sequence forward,
    with the cache in place (buffers of 4 positions: grown mid-sequence) and fed as tensors."""
    _, path = float_export
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[:, 5:]
    caches = []
    for dec in (OrtDecoder(path, capacity=4), OrtDecoder(path, in_place=False)):
        _, past = dec.step(ids[:, :5].numpy(), dec.empty(2))
        logits, presents = dec.step(ids[:, 5:].numpy(), past)
        err = np.abs(logits - ref.numpy()).max() / np.abs(ref.numpy()).max()
        assert err < 1e-5
        caches.append(dec.cache() if dec.in_place else presents)
    assert caches[0][0].shape == caches[1][0].shape == (2, 2, 8, 16)
    for a, b in zip(*caches, strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_in_place_decoder_continues_its_own_last_step_only(float_export):
    dec = OrtDecoder(float_export[1])
    assert dec.in_place
    _, past = dec.step(np.asarray([_prompt()]), dec.empty(1))
    assert past[0].shape == (1, 2, 12, 0)
    with pytest.raises(ExportError, match="continues its own last step only"):
        dec.step(np.asarray([[1]]), [np.zeros((1, 2, 3, 0), np.float32)])


def test_bad_config_and_path_are_typed_errors(model, tmp_path):
    with pytest.raises(ConfigError, match="accuracy_level"):
        DecoderConfig(accuracy_level=2)
    with pytest.raises(ConfigError, match="int8_block: 48; allowed: 128, 64, 32, 16 or None"):
        DecoderConfig(int8_block=48)
    with pytest.raises(ConfigError, match="min_token_agreement: 1.5; allowed: 0 to 1"):
        DecoderConfig(min_token_agreement=1.5)
    with pytest.raises(ConfigError, match="kv_form: 'mqa'; allowed: ort-gqa, fold, gqa, repeat"):
        DecoderConfig(kv_form="mqa")
    with pytest.raises(ConfigError, match="quantized_parity_steps: -1; allowed: 0 to 4096"):
        DecoderConfig(quantized_parity_steps=-1)
    with pytest.raises(ExportError, match="must end in .onnx"):
        export_decoder(model, tmp_path / "m.bin")
    assert not list(tmp_path.iterdir())


def test_an_encoder_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    from slimformer.errors import UnsupportedModelError

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64)).eval()
    with pytest.raises(UnsupportedModelError, match="causal LM"):
        export_decoder(bert, tmp_path / "bert.onnx")
    assert not list(tmp_path.iterdir())


def _weight_only(model, **kw):
    from slimformer.data.datasets import TensorDictDataset
    from slimformer.quantize.api import quantize
    from slimformer.quantize.config import QuantConfig

    ids = torch.randint(0, VOCAB, (16, 16), generator=torch.Generator().manual_seed(0))
    data = TensorDictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    cfg = QuantConfig(weight_only=True, method="minmax", calib_batch_size=8, **kw)
    return quantize(model, cfg, data).model


@pytest.fixture(scope="module")
def int4_export(model, tmp_path_factory):
    qmodel = _weight_only(model, weight_bits=4, group_size=32)
    path = tmp_path_factory.mktemp("dec") / "int4.onnx"  # level 0: what PyTorch computes
    return qmodel, export_decoder(qmodel, path, DecoderConfig(accuracy_level=0)), path


def _nbits_linears(proto) -> list[tuple]:
    """``(node, B, scales, zero_points or None)`` per quantized Linear: a merged MatMulNBits
    (export.fusenbits: its output Split) cut back into the Linears it holds."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    split = {n.input[0]: inits[n.input[1]].tolist() for n in proto.graph.node
             if n.op_type == "Split"}
    out = []
    for n in proto.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        arrs = [inits[i] if i else None for i in (*n.input[1:], "", "")[:3]]
        cuts = np.cumsum([0, *split.get(n.output[0], [arrs[0].shape[0]])])
        out += [(n, *(x[a:b] if x is not None else None for x in arrs))
                for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return out


def test_int4_g32_matmulnbits_holds_our_codes(model, int4_export):
    """Every quantized Linear is in a MatMulNBits (int4, block 32; the LM head int8: head_bits)
    with our packed codes; Q/K/V and gate/up, reading one input, share one op (export.fusenbits)."""
    from slimformer.quantize.inference import to_inference
    from slimformer.quantize.pack import unpack_codes

    qmodel, res, path = int4_export
    proto = onnx.load(str(path))
    parts = _nbits_linears(proto)
    assert len(parts) == len(qmodel.quant.linears) == res.nbits["replaced"] == 15
    assert res.nbits["by_form"] == {"int4 g32": 14, "int8 g32": 1}
    # per layer: Q/K/V one op, gate/up one op, O and down alone; the head alone
    assert res.nbits["fused"] == 4 and len({id(p[0]) for p in parts}) == 9
    assert not [n for n in proto.graph.node if n.op_type == "MatMul" and
                any(i.name == n.input[1] for i in proto.graph.initializer)]
    lqs = list(to_inference(qmodel).quant.linears.values())
    matched = set()
    for node, *arrs in parts:  # each part holds one Linear's codes, scales and zero points exactly
        b, s, z = (torch.from_numpy(a.copy()) for a in arrs)
        bits = next(a.i for a in node.attribute if a.name == "bits")
        n, blocks, blob = b.shape
        assert blob == 32 * bits // 8 and s.shape == (n, blocks)
        assert z.shape == (n, -(-blocks * bits // 8))
        codes = unpack_codes(b.reshape(-1), bits, (n * blocks * 32,)).reshape(-1, 32)
        hit = [lq.name for lq in lqs if lq.int_weight.shape == codes.shape
               and torch.equal(lq.int_weight, codes)]
        assert len(hit) == 1
        lq = next(lq for lq in lqs if lq.name == hit[0])
        assert torch.equal(s.reshape(-1, 1), lq.wq.scale)
        zero = unpack_codes(z.reshape(-1), bits, (z.numel() * 8 // bits,)).reshape(n, -1)[:, :blocks]
        assert torch.equal(zero.reshape(-1, 1).float(), lq.wq.zero)
        matched.add(hit[0])
    assert len(matched) == 15


def test_int4_parity_with_the_quantized_pytorch_model(model, int4_export):
    qmodel, res, path = int4_export
    for outs in res.parity.values():  # ORT vs our quantized model: the same arithmetic
        assert min(m["sqnr_db"] for m in outs.values()) > 90, outs
    ids = torch.tensor([_prompt()])
    logits, _ = OrtDecoder(path).step(ids.numpy(), OrtDecoder(path).empty(1))
    with torch.no_grad():  # vs the float model: the quantization error, far larger
        from slimformer.export.genparity import compare

        assert compare(model(input_ids=ids).logits, torch.from_numpy(logits))["sqnr_db"] < 40
    prompt = _prompt()
    ref = generate_tokens(qmodel, prompt, 32, cache_arg="cache")
    got = generate_onnx(OrtDecoder(path), prompt, 32)
    agree = sum(a == b for a, b in zip(ref.new_ids, got.new_ids, strict=True)) / 32
    assert agree >= 0.95
    # judged on quantized_parity_steps (128), cut to the 128 positions: 8 prompt tokens + 119
    assert res.tokens["agreement"] >= 0.95 and res.tokens["steps"] == 119
    size = res.size_bytes
    assert res.nbits["packed_bytes"] * 5 < res.nbits["float_bytes"] and size > 0


def test_int8_symmetric_per_channel_leaves_out_zero_points(model, tmp_path):
    qmodel = _weight_only(model, weight_bits=8, symmetric=True)
    res = export_decoder(qmodel, tmp_path / "int8.onnx", DecoderConfig(accuracy_level=0))
    parts = _nbits_linears(onnx.load(str(tmp_path / "int8.onnx")))
    assert len(parts) == 15 and all(len(p[0].input) == 3 and p[3] is None for p in parts)
    assert set(res.nbits["by_form"]) == {"int8 g64", "int8 g128"}  # K = 64 or 128
    assert min(m["sqnr_db"] for m in res.parity["decode"].values()) > 90


def test_the_default_level_4_splits_groups_into_int8_activation_blocks(model, tmp_path):
    """By default the decoder graph runs int8 activations (accuracy_level 4) in blocks of at
    most INT8_BLOCK inputs: a group of 64 is written as two blocks of 32, its scale and zero point
    repeated, the codes unchanged; level 0 keeps the group's own block."""

    from slimformer.export.nbits import INT8_BLOCK

    assert DecoderConfig().accuracy_level == 4 and INT8_BLOCK == 32
    qmodel = _weight_only(model, weight_bits=4, group_size=64)
    res = export_decoder(qmodel, tmp_path / "l4.onnx", DecoderConfig(min_token_agreement=0.0))
    ref = export_decoder(qmodel, tmp_path / "l0.onnx", DecoderConfig(accuracy_level=0))
    assert res.accuracy_level == 4 and ref.accuracy_level == 0
    assert set(res.nbits["by_form"]) == {"int4 g32", "int8 g32"}
    assert set(ref.nbits["by_form"]) == {"int4 g64", "int8 g64"}
    parts = [_nbits_linears(onnx.load(str(tmp_path / f))) for f in ("l4.onnx", "l0.onnx")]
    for (a, ba, sa, _), (b, bb, sb, _) in zip(*parts, strict=True):  # same Linears, same order
        assert [x.i for x in a.attribute if x.name == "accuracy_level"] == [4]
        assert [x.i for x in b.attribute if x.name == "accuracy_level"] == [0]
        assert ba.tobytes() == bb.tobytes()  # the same packed codes, split into more blocks
        assert np.array_equal(sa, np.repeat(sb, 2, axis=1))
    # int8 activations are not what PyTorch computes, but close to it: logits of the prefill and
    # the decode step vs the quantized PyTorch model (level 0 is exact: > 90 dB)
    for outs in res.parity.values():
        assert min(m["sqnr_db"] for m in outs.values()) > 20, outs
    for outs in ref.parity.values():
        assert min(m["sqnr_db"] for m in outs.values()) > 90, outs


def test_unsupported_bits_are_a_typed_error(model, tmp_path):
    qmodel = _weight_only(model, weight_bits=3, group_size=32)
    with pytest.raises(ExportError, match="3-bit weights have no MatMulNBits form; allowed: 2, 4, 8"):
        export_decoder(qmodel, tmp_path / "w3.onnx")
    assert not list(tmp_path.iterdir())


def test_export_onnx_of_a_weight_only_model_writes_matmulnbits(int4_export, tmp_path):
    """`export onnx` (full sequences) of the INT4 model: MatMulNBits, equal to PyTorch's model."""
    from slimformer.export import OnnxConfig, export_onnx

    qmodel = int4_export[0]
    ids = torch.tensor([_prompt(), _prompt(seed=4)])
    res = export_onnx(qmodel, tmp_path / "full.onnx",
                      {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                      OnnxConfig(unused_inputs="warn"))
    assert res.quantized and res.fusion["integer_matmuls"] == 9  # Q/K/V, gate/up merged
    assert min(p["sqnr_db"] for p in res.parity.values()) > 90
    assert any("15 Linears as com.microsoft::MatMulNBits (" in w and "int4 g32: 14" in w and
               "int8 g32: 1" in w for w in res.warnings), res.warnings
    ops = {n.op_type for n in onnx.load(str(tmp_path / "full.onnx")).graph.node}
    assert "MatMulNBits" in ops and [p.name for p in tmp_path.iterdir()] == ["full.onnx"]


def test_quantized_embedding_table_becomes_gather_block_quantized(model, tmp_path):
    """embedding_bits 4: the table's Gather is GatherBlockQuantized with our per-row codes."""
    qmodel = _weight_only(model, weight_bits=4, group_size=32, embedding_bits=4)
    res = export_decoder(qmodel, tmp_path / "emb.onnx", DecoderConfig(accuracy_level=0))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "emb.onnx")).graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 9
    assert res.nbits["by_form"]["embedding int4 g64"] == 1
    for outs in res.parity.values():
        assert min(m["sqnr_db"] for m in outs.values()) > 90, outs


@pytest.fixture(scope="module")
def fold_exports(model, int4_export, tmp_path_factory):
    """The float and INT4 decoder graphs in the plain-attention form OpenVINO reads."""
    folder = tmp_path_factory.mktemp("fold")
    cfg = DecoderConfig(kv_form="fold", accuracy_level=0)
    return [export_decoder(m, folder / f"{k}.onnx", cfg).path
            for k, m in (("float", model), ("int4", int4_export[0]))]


def test_openvino_runs_the_fold_decoder_file(model, int4_export, fold_exports):
    """OpenVINO (f32) reads the ONNX decoder graph, MatMulNBits included: greedy tokens."""
    pytest.importorskip("openvino")
    from slimformer.export.genparity import token_parity
    from slimformer.export.openvino import OvDecoder

    prompt = _prompt()
    assert token_parity(model, OvDecoder(fold_exports[0]), prompt, 32).agreement == 1.0
    qmodel, path = int4_export[0], fold_exports[1]
    tp = token_parity(qmodel, OvDecoder(path), prompt, 32)
    assert tp.agreement >= 0.95, tp
    got = generate_onnx(OvDecoder(path), prompt, 8)
    assert got.decode_tokens_per_s > 0 and len(got.new_ids) == 8


def test_openvino_refuses_the_onnx_runtime_form_and_says_which_to_export(float_export):
    pytest.importorskip("openvino")
    from slimformer.export.openvino import OvDecoder

    with pytest.raises(ExportError, match=r"GroupQueryAttention.*DecoderConfig.for_openvino\(\)"):
        OvDecoder(float_export[1])


def test_stateful_openvino_decoder_keeps_the_cache_inside(fold_exports):
    """The make-stateful form (default) computes what the explicit-cache form does, step by
    step; it continues only its own last step."""
    pytest.importorskip("openvino")
    from tests.export.ovsteps import stateful_matches_explicit

    inner, _, ids, _ = stateful_matches_explicit(fold_exports[0], _prompt())
    with pytest.raises(ExportError, match="continues its own last step only"):
        inner.step(ids, [np.zeros((1, 1, 3, 0), np.float32)])  # not its cached length


def test_openvino_names_an_op_it_cannot_read(float_export, tmp_path):
    pytest.importorskip("openvino")
    from onnx import helper

    from slimformer.export.openvino import OvDecoder

    proto = onnx.load(str(float_export[1]))
    logits = next(n for n in proto.graph.node if "logits" in n.output)
    mid = helper.make_node("NoSuchKernel", [logits.input[0]], ["odd"], domain="com.microsoft")
    logits.input[0] = "odd"
    proto.graph.node.insert(list(proto.graph.node).index(logits), mid)
    onnx.save(proto, str(tmp_path / "odd.onnx"))
    with pytest.raises(ExportError, match="com.microsoft::NoSuchKernel"):
        OvDecoder(tmp_path / "odd.onnx")


def test_level_4_under_the_token_bar_falls_back_to_level_0(tmp_path):
    """Outlier channels (a norm gain x30 on every 8th channel): ORT's int8 activations at
    accuracy_level 4 flip a near-tied greedy token; the export writes level 0 and says so, or
    without the fallback fails with no file. Quantized with the residual rotation (the default
    at 4 bits) the channels are spread over all of them and level 4 keeps every token."""
    m = _llama()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.post_attention_layernorm.weight[::8] *= 30.0
    cfg = DecoderConfig(accuracy_level=4, min_token_agreement=1.0)
    (tmp_path / "rotated").mkdir()
    rotated = export_decoder(_weight_only(m, weight_bits=4, group_size=32),
                             tmp_path / "rotated" / "q.onnx", cfg)
    assert rotated.accuracy_level == 4 and rotated.tokens["agreement"] == 1.0
    qmodel = _weight_only(m, weight_bits=4, group_size=32, rotate="off")
    res = export_decoder(qmodel, tmp_path / "q.onnx", cfg)
    assert res.accuracy_level == 0 and res.tokens["agreement"] == 1.0
    assert any("accuracy_level 4:" in w and "written at accuracy_level 0" in w
               for w in res.warnings), res.warnings
    nodes = [n for n in onnx.load(str(tmp_path / "q.onnx")).graph.node
             if n.op_type == "MatMulNBits"]
    assert {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {0}
    with pytest.raises(ExportError, match=r"% of 119 steps agree .*accuracy_level 4 runs int8"):
        export_decoder(qmodel, tmp_path / "strict.onnx",
                       DecoderConfig(accuracy_level=4, min_token_agreement=1.0,
                                     accuracy_fallback=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "rotated"]


@pytest.mark.parametrize("name", ["bart", "t5", "whisper"])
def test_encoder_decoder_models_are_refused_naming_what_is_missing(name, tmp_path):
    """Encoder-decoders (their base model and, for BART, the LM head that would otherwise trace
    input_ids into both halves) get a typed error naming the missing graphs; no file."""
    import transformers

    from slimformer.errors import UnsupportedModelError
    from slimformer.models.generality import GENERALITY
    from slimformer.models.loading import load_model

    models = [load_model(GENERALITY[name]).module]
    if name == "bart":
        cfg = transformers.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                      encoder_attention_heads=4, decoder_attention_heads=4,
                                      encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=500)
        models.append(transformers.BartForConditionalGeneration(cfg).eval())
    for m in models:
        with pytest.raises(UnsupportedModelError, match="encoder-decoder model.*cross-attention "
                                                        "cache.*graph: full"):
            export_decoder(m, tmp_path / "d.onnx")
    assert not list(tmp_path.iterdir())


def test_timed_decoders_alternate_in_a_rotated_order():
    """Every round runs each decoder once, and no decoder always runs right after another."""
    from slimformer.export.ortgen import time_decoders

    log = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def empty(self, batch):
            return [np.zeros((batch, 1, 0, 1), np.float32)]

        def step(self, ids, past):
            if ids.shape[1] == 10:  # a timed prefill (the warm-up's prompt is 8 tokens)
                log.append(self.name)
            t = past[0].shape[2] + ids.shape[1]
            return np.zeros((1, ids.shape[1], 5), np.float32), [np.zeros((1, 1, t, 1),
                                                                          np.float32)]

    out = time_decoders({k: Fake(k) for k in "abc"}, list(range(10)), 2, rounds=3)
    assert log == list("abcbcacab") and list(out) == list("abc")
    assert all(v["rounds"] == 3 and v["decode_tokens_per_s"] > 0 for v in out.values())
