"""The qat stage: an ordinary quantized artifact (restore, ONNX parity), order rules, the CLI."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.data.datasets import get_dataset
from slimformer.errors import ConfigError
from slimformer.export.onnx import export_onnx
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.qat.api import qat
from slimformer.qat.config import QatConfig
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference
from slimformer.quantize.serialize import save_quantized
from slimformer.recipe import parse_recipe
from slimformer.stages.artifact import restore
from slimformer.store.manifest import stage_entry

runner = CliRunner()


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    err = float(((ref.double() - got.double()) ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(float((ref.double() ** 2).sum()) / err)


def test_saved_qat_model_restores_exactly_and_exports_with_ptq_parity(tmp_path):
    spec = ZooSpec(name="vit-digits-seq")
    lm = load_model(spec)
    qm = to_inference(quantize(lm.module, QuantConfig(method="repq", weight_bits=4, act_bits=4,
                                                      calib_samples=64),
                               get_dataset("digits-seq", "calib")).model, inplace=True)
    cfg = QatConfig(steps=40, eval_every=20, rows=256)
    res = qat(qm, lm.module, cfg, get_dataset("digits-seq", "train", sample=256))
    save_quantized(res.model, tmp_path / "q", spec, config=qm.config,
                   after=[stage_entry("qat", cfg, {"steps": res.log.steps})])
    meta = json.loads((tmp_path / "q" / "slimformer.json").read_text())
    assert [s["stage"] for s in meta["stages"]] == ["quantize", "qat"]
    r = restore(tmp_path / "q")
    assert r.applied == ["quantize", "qat"] and r.quantized
    x = get_dataset("digits-seq", "test", limit=256).inputs["x"]
    with torch.no_grad():
        ours, back, student = res.model(x=x), r.module(x=x), res.student(x=x)
    assert torch.equal(ours, back)  # the folder holds exactly the written-back model
    assert sqnr_db(student, back) >= 60  # measured: identical (inf dB)
    assert not torch.equal(back, qm(x=x))  # and it is not the PTQ model
    # ONNX QDQ export: parity as for PTQ (test_onnx's bar)
    onnx_res = export_onnx(r.module, tmp_path / "q.onnx", {"x": x[:2]})
    for label in ("traced", "other"):
        p = onnx_res.parity[label]
        assert p["within_1_step"] >= 0.95 and p["argmax_agreement"] >= 0.9, (label, p)


def test_qat_needs_a_quantized_model():
    with pytest.raises(ConfigError, match="put a quantize stage before it"):
        parse_recipe({"model": {"source": "zoo", "name": "vit-digits-seq"},
                      "stages": [{"type": "qat"}]})
    parse_recipe({"model": {"source": "zoo", "name": "vit-digits-seq"},
                  "stages": [{"type": "quantize"}, {"type": "qat", "steps": 5}]})
    with pytest.raises(ConfigError, match="one quantize stage per recipe"):
        parse_recipe({"model": {"source": "zoo", "name": "vit-digits-seq"},
                      "stages": [{"type": "quantize"}, {"type": "qat"}, {"type": "quantize"}]})


def test_cli_qat_of_a_float_model_then_of_its_folder(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    res = runner.invoke(app, ["qat", "vit-digits-seq", "--weight-bits", "4", "--act-bits", "4",
                              "--steps", "10", "--eval-every", "5", "--rows", "64", "--set",
                              "quantize.calib_samples=32", "--limit", "200", "--out", str(a)])
    assert res.exit_code == 0, res.output
    assert "QAT on digits-seq" in res.output and "kept step" in res.output
    report = json.loads((a / "report.json").read_text())
    assert [s["type"] for s in report["stages"]] == ["evaluate", "quantize", "qat", "evaluate"]
    m = report["stages"][2]["metrics"]
    assert m["steps"] <= 10 and m["fit_rows"] + m["held_rows"] == 64 and m["loss"] == "kl"
    assert m["writeback_db"] >= 60
    res = runner.invoke(app, ["qat", str(a), "--steps", "5", "--eval-every", "5", "--rows", "32",
                              "--limit", "100", "--out", str(b)])
    assert res.exit_code == 0, res.output
    meta = json.loads((b / "quantized" / "slimformer.json").read_text())
    assert [s["stage"] for s in meta["stages"]] == ["quantize", "qat", "qat"]
    res = runner.invoke(app, ["qat", str(a), "--set", "quantize.method=minmax", "--out",
                              str(tmp_path / "c")])
    assert res.exit_code == 2 and "quantized already" in res.output


def test_qat_with_run_time_activation_ranges_saves_exports_onnx_and_refuses_qonnx(tmp_path):
    """Per-token inputs: fine-tuned, saved with the run-time grids, exported with parity."""
    a = tmp_path / "a"
    res = runner.invoke(app, ["qat", "vit-digits-seq", "--weight-bits", "4", "--act-bits", "4",
                              "--steps", "10", "--eval-every", "5", "--rows", "64", "--set",
                              "quantize.calib_samples=32", "--act-dynamic", "token",
                              "--limit", "200", "--out", str(a)])
    assert res.exit_code == 0, res.output
    r = restore(a / "quantized")
    assert r.applied == ["quantize", "qat"]
    assert {lq.act.dynamic for lq in r.module.quant.linears.values()} == {"token"}
    x = get_dataset("digits-seq", "test", limit=64).inputs["x"]
    onnx_res = export_onnx(r.module, tmp_path / "q.onnx", {"x": x[:2]})
    for label in ("traced", "other"):
        p = onnx_res.parity[label]
        assert p["within_1_step"] >= 0.95 and p["argmax_agreement"] >= 0.9, (label, p)
    f = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", "qonnx", str(a), "--out", str(f), "--rows", "4"])
    assert res.exit_code == 2 and "run time" in res.output and "act_dynamic: off" in res.output
    assert list(tmp_path.glob("m*.onnx")) == []


def test_qat_with_power_of_two_scales_exports_to_hls_bit_accurately(tmp_path):
    """FPGA targets: QAT keeps every scale a power of two, so ``export hls`` takes its folder and
    the C simulation reproduces its fixed-point reference exactly."""
    from slimformer.quantize.act import ActQuantizer

    q, h = tmp_path / "q", tmp_path / "h"
    res = runner.invoke(app, ["qat", "vit-digits-seq", "--method", "minmax", "--weight-bits", "4",
                              "--act-bits", "4", "--set", "quantize.power_of_two_scales=true",
                              "--set", "quantize.softmax=none", "--set", "quantize.gptq=false",
                              "--steps", "50", "--eval-every", "25", "--rows", "512",
                              "--weight-lr", "3e-4", "--scale-lr", "3e-3", "--limit", "200",
                              "--out", str(q)])
    assert res.exit_code == 0, res.output
    m = json.loads((q / "report.json").read_text())["stages"][2]["metrics"]
    assert m["writeback_db"] >= 60  # written back exactly (what it learns: test_train.py)
    model = restore(q / "quantized").module

    def is_power(t):
        return torch.equal(torch.exp2(torch.log2(t).round()), t)

    assert all(is_power(lq.wq.scale) for lq in model.quant.linears.values())
    acts = [a for a in model.modules() if isinstance(a, ActQuantizer) and a.mode == "quant"]
    assert acts and all(is_power(a.scale_zero()[0]) for a in acts)
    res = runner.invoke(app, ["export", "hls", str(q / "quantized"), "--out", str(h)])
    assert res.exit_code == 0, res.output
    c = json.loads((h / "report.json").read_text())["stages"][-1]["metrics"]
    assert c["csim_max_error"] == 0.0 and c["csim_agreement_reference"] == 1.0
    assert c["csim_accuracy_csim"] >= c["csim_accuracy_float"] - 0.08  # W4A4: within 8 points


def test_qat_keeps_outlier_channels_float_and_qonnx_refuses_them(tmp_path, planted_vit):
    """A model whose quantizers keep outlier input channels float (a planted massive channel
    after the first norm, as BERT-family encoders carry): fine-tuned (the float product in the
    Brevitas layer), written back and saved with the channels, exported to ONNX with parity;
    ``export qonnx`` refuses it and writes nothing."""
    spec, lm = ZooSpec(name="vit-fmnist"), planted_vit
    qm = quantize(lm.module, QuantConfig(method="minmax", smooth="off", calib_samples=64,
                                         weight_bits=4, act_bits=4),
                  get_dataset("fashion-mnist", "calib")).model
    split = {lq.name for lq in qm.quant.linears.values() if lq.act.outliers is not None}
    assert split
    cfg = QatConfig(steps=40, eval_every=20, rows=256, batch_size=16, patience=0, metric="db")
    res = qat(qm, lm.module, cfg, get_dataset("fashion-mnist", "train", sample=256))
    x = get_dataset("fashion-mnist", "test", limit=128).inputs["pixel_values"]
    with torch.no_grad():
        ours, student, ptq = (m(pixel_values=x) for m in (res.model, res.student, qm))
    # measured: held-out 13.1 -> 15.5 dB vs float in 40 steps; written back: inf dB
    assert res.log.best_step > 0 and res.log.best.metrics["db"] > res.log.judgements[0].metrics["db"]
    assert sqnr_db(student, ours) >= 60 and not torch.equal(ours, ptq)
    assert {lq.name for lq in res.model.quant.linears.values()
            if lq.act.outliers is not None} == split
    save_quantized(res.model, tmp_path / "q", spec, config=qm.config,
                   after=[stage_entry("qat", cfg, {"steps": res.log.steps})])
    r = restore(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(r.module(pixel_values=x), ours)
    onnx_res = export_onnx(r.module, tmp_path / "q.onnx", {"pixel_values": x[:2]})
    for label in ("traced", "other"):
        p = onnx_res.parity[label]
        assert p["within_1_step"] >= 0.95 and p["argmax_agreement"] >= 0.9, (label, p)
    f = tmp_path / "m.onnx"
    out = runner.invoke(app, ["export", "qonnx", str(tmp_path / "q"), "--out", str(f),
                              "--rows", "4"])
    assert out.exit_code == 2 and "outlier channels" in out.output, out.output
    assert "outlier_channels: 0" in out.output and list(tmp_path.glob("m*.onnx")) == []
