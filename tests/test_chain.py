"""Every command's output is the next command's MODEL: prune -> quantize -> export, eval each."""

import json

import pytest
from typer.testing import CliRunner

from slimformer.cli import app

runner = CliRunner()


def _ok(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_prune_quantize_export_onnx_and_hls_command_by_command(tmp_path):
    p, q = tmp_path / "pruned", tmp_path / "quantized"
    _ok("prune", "vit-digits-seq", "--out", p, "--method", "magnitude", "--finetune-steps", "0",
        "--structures", "mlp", "--ratio", "0.5")
    assert (p / "pruned" / "slimformer.json").is_file() and (p / "report.json").is_file()
    _ok("quantize", p, "--out", q, "--method", "minmax", "--softmax", "none",
        "--power-of-two-scales")  # quantize the pruned model, FPGA-ready
    meta = json.loads((q / "quantized" / "slimformer.json").read_text())
    assert meta["slice_spec"]  # the pruning travels with the quantized artifact
    # one manifest format: the stages applied, in order, each with its config and results
    assert meta["format"] == "slimformer-artifact" and meta["kind"] == "quantized"
    assert [s["stage"] for s in meta["stages"]] == ["prune", "quantize"]
    prune_rec, quant_rec = meta["stages"]
    assert prune_rec["config"]["method"] == "magnitude" and prune_rec["config"]["ratio"] == 0.5
    assert prune_rec["result"]["params_after"] < prune_rec["result"]["params_before"]
    assert quant_rec["config"]["method"] == "minmax" and quant_rec["config"]["power_of_two_scales"]
    pmeta = json.loads((p / "pruned" / "slimformer.json").read_text())
    assert pmeta["stages"] == [prune_rec] and pmeta["slice_spec"] == meta["slice_spec"]
    ev = []
    for m in ("vit-digits-seq", p, q):
        text = _ok("eval", m, "--repeats", "1", "--json")
        ev.append(json.loads(text[text.index("{"):]))
    assert ev[1]["size"]["params"] < ev[0]["size"]["params"]
    assert min(e["accuracy"] for e in ev) > 0.5
    onnx = tmp_path / "m.onnx"
    out = _ok("export", "onnx", q, "--out", onnx)
    assert "QDQ" in out and onnx.stat().st_size > 1000
    hls = tmp_path / "hls"
    _ok("export", "hls", q, "--out", hls, "--no-csim")
    assert any(hls.rglob("*.cpp"))
    res = runner.invoke(app, ["prune", str(q), "--out", str(tmp_path / "again")])
    assert res.exit_code == 2 and "holds a quantized model" in res.output


@pytest.mark.slow
def test_search_output_is_a_model_for_the_next_command(tmp_path):
    s = tmp_path / "search"
    _ok("search", "vit-digits-seq", "--out", s, "--samples", "4", "--train-steps", "10",
        "--front-max", "1", "--val-rows", "200")
    assert (s / "search" / "slimformer.json").is_file() and (s / "state" / "search").is_dir()
    text = _ok("eval", s, "--repeats", "1", "--json")  # the chosen float sub-network
    assert json.loads(text[text.index("{"):])["accuracy"] > 0.3
    _ok("quantize", s, "--out", tmp_path / "q", "--method", "minmax")
    assert (tmp_path / "q" / "quantized" / "slimformer.json").is_file()
    # a worker joins that study (its storage and super-network) from another output folder
    journal = next((s / "state" / "search").rglob("*.journal"))
    supernet = next((s / "state" / "search").rglob("*.supernet.pt"))
    w = tmp_path / "worker"
    args = ("search", "vit-digits-seq", "--samples", "6", "--train-steps", "10", "--val-rows",
            "200", "--worker")
    res = runner.invoke(app, [*map(str, args), "--out", str(w)])
    assert res.exit_code == 2 and "storage" in res.output and "--supernet" in res.output
    assert not w.exists()
    text = _ok(*args, "--out", w, "--storage", journal, "--supernet", supernet)
    assert "holds 8 measured sub-networks" in text  # reference, front row, 6 samples
    rep = json.loads((w / "report.json").read_text())
    assert rep["stages"][0]["metrics"]["worker"] and not (w / "state").exists()
