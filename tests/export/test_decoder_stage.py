"""`export onnx` and the recipe export stage on a causal LM: the KV-cache decoder graph.

A tiny random Llama folder with a WordLevel tokenizer (tests.stages.test_generate), float and
weight-only INT4 (groups of 32); the stage's own greedy-token parity and tokens/s are checked.
"""

import json

import onnx
import pytest
from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.errors import ExportError
from tests.stages.test_generate import build_tiny_lm

runner = CliRunner()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_lm")
    build_tiny_lm(folder)
    return folder


@pytest.fixture(scope="module")
def int4(lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("w4") / "run"
    res = runner.invoke(app, ["-q", "quantize", str(lm), "--out", str(out), "--weight-only",
                              "--method", "minmax", "--weight-bits", "4", "--group-size", "32",
                              "--calib-samples", "8", "--limit", "16"])
    assert res.exit_code == 0, res.output
    return out


def _export(*args):
    res = runner.invoke(app, ["export", "onnx", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_float_causal_lm_writes_the_decoder_graph(lm, tmp_path):
    res = _export(lm, "--out", tmp_path / "f.onnx")
    assert res["graph"] == "decoder" and not res["quantized"]
    names = [i.name for i in onnx.load(str(tmp_path / "f.onnx")).graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in names
    tok = res["tokens"]  # the float file's greedy tokens equal PyTorch's on every step
    assert tok["agreement"] == 1.0 and tok["steps"] == 32 and tok["first_difference"] is None
    assert 1 <= tok["prompt_tokens"] <= 64 - 33  # the model's 64 positions hold the steps too
    assert res["speed"] == {} and [p.name for p in tmp_path.iterdir()] == ["f.onnx"]
    full = _export(lm, "--out", tmp_path / "full.onnx", "--graph", "full")
    assert "graph" not in full and full["inputs"]  # the full-sequence graph when asked


def test_weight_only_export_parity_speed_and_accuracy_level(int4, tmp_path):
    res = _export(int4, "--out", tmp_path / "q.onnx", "--tokens-per-s", "--accuracy-level", "4")
    assert res["graph"] == "decoder" and res["quantized"]
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 9  # 15 with lm_head: per layer Q/K/V and gate/up share one op
    # and the embedding table: 8 bits per row, the default of a causal LM quantized to 4 bits
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1
    assert res["nbits"]["replaced"] == 16 and res["nbits"]["by_form"]["embedding int8 g32"] == 1
    assert {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {4}
    assert res["tokens"]["agreement"] >= 0.95  # vs the quantized PyTorch model
    sp = res["speed"]
    for k in ("prefill", "decode"):
        assert sp[f"{k}_tokens_per_s"] > 0 and sp[f"float_{k}_tokens_per_s"] > 0
        assert sp[f"{k}_speedup"] == pytest.approx(
            sp[f"{k}_tokens_per_s"] / sp[f"float_{k}_tokens_per_s"], rel=1e-2)
    assert res["size_bytes"] < sp["float_file_bytes"]


def test_recipe_stage_reports_tokens_and_refuses_a_bad_agreement_bar(lm, tmp_path):
    from slimformer.errors import ConfigError
    from slimformer.pipeline import run
    from slimformer.recipe import parse_recipe

    out = tmp_path / "out"
    recipe = parse_recipe({"name": "d", "model": {"source": "hf_dir", "path": str(lm)},
                           "data": {"eval_limit": 16, "calib_rows": 8},
                           "stages": [{"type": "quantize", "weight_only": True,
                                       "method": "minmax", "weight_bits": 4, "group_size": 32,
                                       "save": False},
                                      {"type": "export", "decode_tokens": 8, "timing_rounds": 1,
                                       "compare_float": False}],
                           "output": {"dir": str(out)}})
    run(recipe)
    st = json.loads((out / "report.json").read_text())["stages"][-1]
    m = st["metrics"]
    # a quantized graph is judged on up to 128 steps (quantized_parity_steps), as many as the
    # model's 64 positions leave after the prompt (which fills them up to decode_tokens),
    # never fewer than decode_tokens
    assert m["graph"] == "decoder" and 8 <= m["token_steps"] <= 128
    assert m["token_agreement"] >= 0.95
    # the decoder graph's default: int8 activations (level 4), or level 0 when it missed the bar
    assert m["decode_tokens_per_s"] > 0
    assert m["accuracy_level"] == 4 or any("written at accuracy_level 0" in n for n in st["notes"])
    assert "onnxruntime decode batch=1" in st["latency"] and "speedup" not in str(m)
    with pytest.raises(ConfigError, match="min_token_agreement"):
        parse_recipe({"name": "d", "model": {"source": "hf_dir", "path": str(lm)},
                      "stages": [{"type": "export", "min_token_agreement": 2}]})


def test_export_openvino_writes_a_stateful_decoder_ir(int4, lm, tmp_path):
    """A weight-only causal LM through `export openvino`: the IR keeps the cache inside (no
    past inputs, a beam_idx input), its int4 codes compressed; its greedy tokens agree with the
    quantized PyTorch model's in ONNX Runtime and in OpenVINO; OvDecoder reads it back."""
    pytest.importorskip("openvino")
    import openvino as ov

    from slimformer.export.genparity import token_parity
    from slimformer.export.openvino import OvDecoder
    from slimformer.stages.artifact import restore

    out = tmp_path / "q.xml"
    res = runner.invoke(app, ["export", "openvino", str(int4), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["graph"] == "decoder" and got["quantized"]
    assert got["tokens"]["agreement"] >= 0.95  # ONNX Runtime, the same file
    assert got["speed"]["openvino_token_agreement"] >= 0.95
    assert any("OpenVINO runs the int4/int8 weights with its default int8 activations" in n
               for n in got["notes"]), got["notes"]
    assert got["speed"]["decode_tokens_per_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.bin", "q.xml"]
    model = ov.Core().read_model(str(out))
    names = {i.get_any_name() for i in model.inputs}
    assert names == {"input_ids", "attention_mask", "position_ids", "beam_idx"}
    assert [o.get_any_name() for o in model.outputs] == ["logits"]
    kinds = {str(o.get_output_element_type(0)) for o in model.get_ordered_ops()
             if o.get_type_name() == "Constant"}
    assert "<Type: 'uint4_t'>" in kinds  # our codes, not float weights
    dec = OvDecoder(out)
    assert dec.stateful and dec.reorder and len(dec.past_names) == 4
    qmodel = restore(int4).module
    assert token_parity(qmodel, dec, list(range(3, 15)), 16).agreement >= 0.95
    with pytest.raises(ExportError, match="stateful=False needs the ONNX decoder graph"):
        OvDecoder(out, stateful=False)


def test_export_onnx_for_openvino_writes_openvino_form(lm, tmp_path):
    """target openvino: the decoder graph in OpenVINO's form (plain attention reading the
    traced kv copies, recorded in the metadata), not ONNX Runtime's GroupQueryAttention."""
    pytest.importorskip("openvino")
    res = _export(lm, "--out", tmp_path / "f.onnx", "--target", "openvino")
    assert res["graph"] == "decoder" and res["tokens"]["agreement"] == 1.0
    proto = onnx.load(str(tmp_path / "f.onnx"))
    assert "GroupQueryAttention" not in {n.op_type for n in proto.graph.node}
    assert {p.key: p.value for p in proto.metadata_props}["slimformer.kv_form"] == "repeat"


def test_encoder_decoder_gets_the_full_graph_and_a_note_saying_why():
    from types import SimpleNamespace

    from slimformer.stages.export import ExportStage
    from slimformer.stages.exportdecoder import wants_decoder

    ctx = SimpleNamespace(loaded=SimpleNamespace(task="seq2seq-lm"), model=None)
    decoder, note = wants_decoder(ctx, ExportStage())
    assert not decoder and "encoder-decoder" in note and "cross-attention caches" in note
    assert wants_decoder(ctx, ExportStage(graph="decoder")) == (True, None)  # then refused
