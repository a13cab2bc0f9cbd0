"""Brevitas's QCDQ / QONNX export of a quantized model: parity, Quant nodes, refusals, stage, CLI."""

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.data.datasets import get_dataset
from slimformer.errors import ExportError, UnsupportedModelError
from slimformer.export.config import OnnxConfig
from slimformer.export.ortrun import run_all, session
from slimformer.export.qonnx import export_brevitas, run_qonnx
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.pipeline import run
from slimformer.qat.convert import to_brevitas
from slimformer.qat.layers import QatLinear
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.recipe import parse_recipe

runner = CliRunner()


def sqnr_db(ref, got) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return 10 * math.log10(float((ref**2).sum()) / max(float(((ref - got) ** 2).sum()), 1e-300))


@pytest.fixture(scope="module")
def digits():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    return lm, get_dataset("digits-seq", "calib"), get_dataset("digits-seq", "test").inputs["x"][:64]


@pytest.fixture(scope="module", params=[(8, False), (4, False), (4, True)],
                ids=["w8a8", "w4a4", "w4a4-symmetric"])
def exported(request, digits, tmp_path_factory):
    """A repq PTQ model, its Brevitas form, and both files written from it (64 test rows)."""
    bits, symmetric = request.param
    lm, calib, x = digits
    qm = quantize(lm.module, QuantConfig(method="repq", weight_bits=bits, act_bits=bits,
                                         calib_samples=32, symmetric=symmetric), calib).model
    bm = to_brevitas(qm)
    d = tmp_path_factory.mktemp("qonnx")
    res = export_brevitas(bm, d / "m.qcdq.onnx", d / "m.qonnx.onnx", {"x": x}, OnnxConfig(),
                          plain=["attention"], artifact=qm)
    return bits, symmetric, lm, qm, bm, res, x


def test_qcdq_in_onnx_runtime_matches_the_model(exported):
    bits, _, lm, qm, bm, res, x = exported
    p = res.parity["qcdq"]
    assert set(p) == {"traced", "other"}  # batch axis symbolic: checked at 65 rows too
    # measured (AMD EPYC, ORT 1.32): W8A8 54.0 dB (one rounding code flips between ORT and
    # PyTorch and spreads; 99.5% of outputs within one output step), W4A4 ~142 dB (no flip)
    for label in p:
        assert p[label]["sqnr_db"] >= 45 and p[label]["within_1_step"] >= 0.99, label
    sess = session(res.qcdq_path)
    out = run_all(sess, {"x": x})["output"]
    with torch.no_grad():
        ref, ptq, fl = bm(x=x).numpy(), qm(x=x).numpy(), lm.module(x=x).numpy()
    assert sqnr_db(ref, out) == pytest.approx(p["traced"]["sqnr_db"], abs=0.01)
    assert sqnr_db(ptq, out) > sqnr_db(fl, ptq) + 10  # the export is the quantized model, not float
    assert (out.argmax(-1) == ptq.argmax(-1)).mean() >= 0.98
    n = sum(isinstance(m, QatLinear) for m in bm.modules())
    ops = res.qcdq_ops
    assert ops["QuantizeLinear"] == n and ops["DequantizeLinear"] == 2 * n  # inputs; + weights
    if bits < 8:
        assert ops["Clip"] >= 2 * n  # sub-8-bit grids: Q -> Clip -> DQ
    assert res.inputs["x"][0] == "batch"


def test_qonnx_quant_nodes_carry_the_artifacts_grids_and_run(exported):
    bits, symmetric, _, qm, bm, res, x = exported
    proto = onnx.load(res.qonnx_path)
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    quants = [n for n in proto.graph.node if n.op_type == "Quant"]
    linears = list(qm.quant.linears.values())
    assert len(quants) == 2 * len(linears)  # a weight and an input Quant per Linear
    assert res.qonnx_nodes["weights_matched"] == len(linears)
    assert {int(consts[n.input[3]]) for n in quants} == {bits}
    weight_nodes = [n for n in quants if n.input[0] in consts]
    for lq in linears:  # our artifact's per-channel scale and zero point, by weight shape/scale
        ours = lq.wq.scale.reshape(-1).numpy()
        hit = [n for n in weight_nodes if consts[n.input[1]].size == ours.size and
               np.array_equal(consts[n.input[1]].reshape(-1), ours)]
        assert hit, lq.name
        zero = np.broadcast_to(consts[hit[0].input[2]], consts[hit[0].input[1]].shape).reshape(-1)
        want = np.zeros_like(ours) if symmetric else lq.wq.zero.reshape(-1).numpy()
        assert np.array_equal(zero, want), lq.name  # Brevitas: signed grid, zero point 0
        assert {a.name: a.i for a in hit[0].attribute if a.name == "signed"} == \
            {"signed": int(symmetric)}
    out = run_qonnx(res.qonnx_path, {"x": x})["output"]  # qonnx's executor, node by node
    qcdq = run_all(session(res.qcdq_path), {"x": x})["output"]
    with torch.no_grad():
        ref = bm(x=x).numpy()
    assert sqnr_db(ref, out) >= 45 and res.parity["qonnx"]["traced"]["sqnr_db"] >= 45
    assert sqnr_db(qcdq, out) >= 45  # the two files compute the same model


def test_refusals_leave_no_file(digits, tmp_path):
    lm, calib, x = digits
    qm = quantize(lm.module, QuantConfig(method="minmax", weight_only=True, weight_bits=4,
                                         group_size=16, calib_samples=16), calib).model
    with pytest.raises(UnsupportedModelError, match="weight groups"):
        to_brevitas(qm)  # what the stage and CLI call first: typed, naming the sites
    qm = quantize(lm.module, QuantConfig(method="minmax", weight_bits=4, act_bits=4,
                                         calib_samples=16), calib).model
    bm = to_brevitas(qm)
    files = tmp_path / "a.qcdq.onnx", tmp_path / "a.qonnx.onnx"
    with pytest.raises(ExportError, match=r"QCDQ file differs .* parts traced as plain ops, not "
                                          r"Brevitas quantizers: attention of blocks.0"):
        export_brevitas(bm, *files, {"x": x[:4]}, OnnxConfig(), min_sqnr_db=400,
                        plain=["attention of blocks.0"])
    with pytest.raises(ExportError, match="no Brevitas quantized layer"):
        export_brevitas(lm.module, *files, {"x": x[:4]})
    assert list(tmp_path.iterdir()) == []  # atomic: nothing half-written


def test_power_of_two_scales_export_with_exact_parity(digits, tmp_path):
    """Fixed-point grids (FPGA targets) convert since QAT learns them: QCDQ and QONNX exact."""
    lm, calib, x = digits
    qm = quantize(lm.module, QuantConfig(method="minmax", weight_bits=8, act_bits=8,
                                         calib_samples=16, power_of_two_scales=True,
                                         softmax="none"), calib).model
    res = export_brevitas(to_brevitas(qm), tmp_path / "a.qcdq.onnx", tmp_path / "a.qonnx.onnx",
                          {"x": x[:4]}, OnnxConfig())
    for form in ("qcdq", "qonnx"):
        assert res.parity[form]["traced"]["sqnr_db"] == math.inf
    assert res.qonnx_nodes["layers_not_in_graph"] == 0


def test_recipe_stage_and_cli(tmp_path):
    out = tmp_path / "run"
    recipe = parse_recipe({
        "name": "q", "model": {"source": "zoo", "name": "vit-digits-seq"},
        "data": {"eval_limit": 128, "calib_rows": 32},
        "stages": [{"type": "quantize", "method": "minmax", "weight_bits": 4, "act_bits": 4,
                    "calib_samples": 32},
                   {"type": "export", "format": "qonnx", "latency_batch_sizes": [4],
                    "latency_repeats": 2}],
        "output": {"dir": str(out)}})
    run(recipe)
    ex = json.loads((out / "report.json").read_text())["stages"][-1]
    m = ex["metrics"]
    assert m["format"] == "qonnx" and m["agreement_with_pytorch"] >= 0.98
    assert m["parity_qcdq_traced_sqnr_db"] >= 45 and m["parity_qonnx_traced_sqnr_db"] >= 45
    assert m["parity_qcdq_traced_driven_sqnr_db"] >= 45 and m["parity_qcdq_traced_site_tol_used"] < 1
    assert set(ex["latency"]) == {"onnxruntime qcdq batch=4"}
    assert any("attention quantizers of" in n for n in ex["notes"])
    assert (out / "export" / "model.qonnx.onnx").is_file()
    f = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", "qonnx", str(out), "--out", str(f), "--rows", "4",
                              "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output[res.output.index("{"):])
    assert got["qonnx_path"] == str(f) and f.is_file() and (tmp_path / "m.qcdq.onnx").is_file()
    res = runner.invoke(app, ["export", "qonnx", "vit-digits-seq", "--out",
                              str(tmp_path / "float.onnx")])
    assert res.exit_code == 2 and "ExportError" in res.output and "float" in res.output
    assert not (tmp_path / "float.onnx").exists()
    with pytest.raises(Exception, match="format qonnx is Brevitas's own"):
        parse_recipe({"stages": [{"type": "export", "format": "qonnx", "target": "openvino"}]})


def _tanh_gelu(g, x, approximate="none"):
    """A wrong translation of ``aten::gelu`` (the tanh approximation for the erf GELU)."""
    def c(v):
        return g.op("Constant", value_t=torch.tensor(v))
    inner = g.op("Mul", c(0.7978845608), g.op("Add", x, g.op("Mul", c(0.044715),
                                                           g.op("Mul", x, g.op("Mul", x, x)))))
    return g.op("Mul", g.op("Mul", c(0.5), x), g.op("Add", c(1.0), g.op("Tanh", inner)))


@pytest.fixture(scope="module")
def tiny_bert():
    """A 2-layer BERT classifier (erf GELU, padded rows), W8A8 min/max, its Brevitas form."""
    from slimformer.data.datasets import TensorDictDataset
    from slimformer.models.generality import GENERALITY, fan_in_init

    lm = load_model(GENERALITY["bert"])
    x = lm.example_inputs(8, seed=3)
    x["attention_mask"][::2, -5:] = 0  # padded rows: masked attention
    fan_in_init(lm.module, x)
    calib = TensorDictDataset(lm.example_inputs(32, seed=1), torch.zeros(32, dtype=torch.long))
    qm = quantize(lm.module, QuantConfig(method="minmax", weight_bits=8, act_bits=8,
                                         calib_samples=32, outlier_channels=0), calib).model
    return to_brevitas(qm), x


def test_bert_judged_quantizer_by_quantizer(tiny_bert, tmp_path):
    # measured 2026-12-06 on this model: every site's inputs within 0.2x the float tolerance,
    # driven outputs ~130 dB. minilm-vader W8A8 (6 layers): the same check passes (driven
    # 134 dB, worst site 0.16x) while end-to-end reads 24.4 dB: one probability code on a
    # rounding tie in layer 0 spreads (docs/export.md)
    bm, x = tiny_bert
    res = export_brevitas(bm, tmp_path / "b.qcdq.onnx", tmp_path / "b.qonnx.onnx", x,
                          OnnxConfig(), plain=["attention"])
    for file, labels in {"qcdq": ("traced", "other"), "qonnx": ("traced",)}.items():
        for label in labels:
            s = res.sites[file][label]
            assert s["sites"] == s["graph_sites"] > 0 and not s["bad"], (file, label)
            assert s["skipped_layers"] == 0  # the classifier reads the pooler: all in the graph
            assert s["worst"][0]["tol_used"] < 0.5 and s["driven"]["sqnr_db"] > 100
            assert "sqnr_db" in res.parity[file][label]  # end-to-end: measured, reported
    kinds = {w["kind"] for w in res.sites["qcdq"]["traced"]["worst"]}
    assert kinds <= {"brevitas", "round"}


def test_a_wrong_translation_fails_site_parity(tiny_bert, tmp_path):
    from slimformer.export import qonnx as qonnx_mod

    bm, x = tiny_bert
    qonnx_mod.SYMBOLICS["aten::gelu"] = _tanh_gelu  # registered by the exporter's setup
    try:
        with pytest.raises(ExportError, match=r"QCDQ file differs .* quantizer sites compute "
                                              r"other inputs from the same codes \(worst .*"
                                              r"output/dense/input_quant"):
            export_brevitas(bm, tmp_path / "b.qcdq.onnx", tmp_path / "b.qonnx.onnx", x,
                            OnnxConfig(dynamic=False))
    finally:
        del qonnx_mod.SYMBOLICS["aten::gelu"]
        for opset in range(qonnx_mod.QCDQ_OPSET, 21):
            torch.onnx.unregister_custom_op_symbolic("aten::gelu", opset)
    assert list(tmp_path.iterdir()) == []
