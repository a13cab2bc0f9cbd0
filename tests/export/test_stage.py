"""The export recipe stage and the `slimformer export` commands."""

import json

import onnx
from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.pipeline import run
from slimformer.recipe import parse_recipe

runner = CliRunner()


def test_recipe_quantize_then_export(tmp_path):
    out = tmp_path / "out"
    recipe = parse_recipe({
        "name": "e", "model": {"source": "zoo", "name": "vit-digits-seq"},
        "stages": [{"type": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 2},
                   {"type": "quantize", "method": "repq", "calib_samples": 64, "save": False},
                   {"type": "export", "latency_batch_sizes": [1, 8], "latency_repeats": 3,
                    "tensorrt": {"batch": [1, 8, 32]}}],
        "output": {"dir": str(out)}})
    run(recipe)
    rep = json.loads((out / "report.json").read_text())
    ev, q, ex = rep["stages"]
    m = ex["metrics"]
    assert m["quantized"] is True and m["ort_integer_matmuls"] > 0
    assert m["agreement_with_pytorch"] >= 0.99  # ONNX Runtime vs the quantized PyTorch model
    assert abs(m["accuracy"] - ev["metrics"]["accuracy"]) < 0.03
    assert m["lint_errors"] > 0  # asymmetric uint8 Q/DQ: TensorRT's TRT001/TRT002
    assert set(ex["latency"]) == {"onnxruntime batch=1", "onnxruntime batch=8",  # + the float
                                  "onnxruntime float batch=1", "onnxruntime float batch=8"}
    model = onnx.load(out / "export" / "model.onnx")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    script = (out / "export" / "model.plan.trtexec.sh").read_text()
    assert "--maxShapes=x:32x8x8" in script
    assert any("TensorRT is not installed" in n for n in ex["notes"])
    lint = ["export", "lint", str(out / "export" / "model.onnx")]
    res = runner.invoke(app, lint)  # errors found: exit 1, unless told to only report
    assert res.exit_code == (1 if m["lint_errors"] else 0), res.output
    assert runner.invoke(app, [*lint, "--fail-on", "never"]).exit_code == 0
    assert runner.invoke(app, [*lint, "--fail-on", "often"]).exit_code == 2


def test_cli_export_onnx_lint_and_tensorrt(tmp_path):
    f = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", "onnx", "vit-digits-seq", "-o", str(f)])
    assert res.exit_code == 0, res.output
    assert "ONNX Runtime vs PyTorch" in res.output and f.is_file()
    # progress as plain lines on stderr (not a terminal): each step's start and end
    assert "export: ONNX file (checked in ONNX Runtime): 1/1" in res.stderr
    assert "export:" not in res.stdout
    quiet = runner.invoke(app, ["--quiet", "export", "onnx", "vit-digits-seq", "-o",
                                str(tmp_path / "q.onnx")])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    res = runner.invoke(app, ["export", "lint", str(f), "--json"])
    assert res.exit_code == 0 and json.loads(res.output) == []  # float: nothing to lint
    res = runner.invoke(app, ["export", "tensorrt", str(f), "-o", str(tmp_path / "m.plan")])
    assert res.exit_code == 2 and "trtexec" in res.output
    res = runner.invoke(app, ["export", "onnx", "vit-digits-seq", "-o", str(f / "m.onnx")])
    assert res.exit_code == 2 and "is not a folder" in res.output  # under a file
    res = runner.invoke(app, ["export", "onnx", "vit-digits-seq", "-o", str(f)])
    assert res.exit_code == 2 and "--overwrite" in res.output  # an existing file
    res = runner.invoke(app, ["export", "tensorrt", str(f), "-o", "x.plan", "--batch", "4,2,1"])
    assert res.exit_code == 2 and "min,opt,max" in res.output


def test_recipe_export_for_openvino_runs_in_openvino(tmp_path):
    """The openvino target: accuracy, agreement and latency measured in OpenVINO itself."""
    import os

    import pytest

    from slimformer.export.openvino import openvino_available

    if not openvino_available() and not os.environ.get("CI"):
        pytest.skip("openvino is not installed")
    out = tmp_path / "out"
    recipe = parse_recipe({
        "name": "ov", "model": {"source": "zoo", "name": "vit-digits-seq"},
        "stages": [{"type": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 1},
                   {"type": "quantize", "method": "repq", "calib_samples": 64, "save": False,
                    "symmetric": True, "softmax": "uniform"},
                   {"type": "export", "target": "openvino", "latency_batch_sizes": [4],
                    "latency_repeats": 2}],
        "output": {"dir": str(out)}})
    ticks = []
    run(recipe, lambda *t: ticks.append(t))
    # progress: each export step starts and ends (the ONNX file, its float baseline, ONNX
    # Runtime evaluation and timing, OpenVINO), after the calibration of the quantize stage
    for step in ("calibrate", "export: ONNX file (checked in ONNX Runtime)",
                 "export: float ONNX file (the baseline)", "export: evaluate in ONNX Runtime",
                 "export: latency in ONNX Runtime", "export: OpenVINO"):
        done = [(d, t) for s, d, t in ticks if s == step]
        assert done[0][0] == 0 and done[-1][0] == done[-1][1] > 0, (step, done)
    ev, _, ex = json.loads((out / "report.json").read_text())["stages"]
    m = ex["metrics"]
    assert m["form_target"] == "openvino"
    # OpenVINO runs the same QDQ file as ONNX Runtime: the same predictions, nearly everywhere
    assert m["openvino_agreement"] >= 0.97 and m["agreement"] >= 0.97
    assert abs(m["openvino_accuracy"] - ev["metrics"]["accuracy"]) < 0.03
    assert {"openvino batch=4", "openvino float batch=4"} <= set(ex["latency"])
    # TensorRT's lint is no concern of an OpenVINO file: at most one line counting its findings
    assert not any(n.startswith("TRT0") for n in ex["notes"]), ex["notes"]
    assert sum(n.startswith("TensorRT QDQ lint") for n in ex["notes"]) <= 1


_NO_DATA_MODEL = {"source": "factory", "factory": "tests.models.test_structure_variants:fourier_net",
                  "inputs": {"x": {"shape": [1, 16, 16]}}}


def test_recipe_without_data_exports_from_synthetic_rows(tmp_path):
    """A model without any data set: an export-only run checks and times the file on synthetic
    example inputs and says accuracy was not measured; a stage that needs rows is refused."""
    import pytest

    from slimformer.errors import DataError

    rep = run(parse_recipe({
        "model": _NO_DATA_MODEL, "output": {"dir": str(tmp_path / "out")},
        "stages": [{"type": "export", "latency_batch_sizes": [2], "latency_repeats": 2}]})).report
    ex = rep.stages[0]
    assert rep.data["eval_samples"] == 0 and rep.data["dataset"].startswith("none")
    assert set(ex.result["parity"]) == {"traced", "other"}  # the whole export result is kept
    assert min(p["cosine"] for p in ex.result["parity"].values()) > 0.9999  # float vs PyTorch
    assert ex.result["path"] == "export/model.onnx" and (tmp_path / "out" / "export" /
                                                         "model.onnx").is_file()
    assert "accuracy" not in ex.metrics and "onnxruntime batch=2" in ex.latency
    assert any(n.startswith("no data: the file was checked and timed on synthetic") for n in
               ex.notes)
    with pytest.raises(DataError, match="no data: this model has no built-in data set"):
        run(parse_recipe({"model": _NO_DATA_MODEL, "output": {"dir": str(tmp_path / "o2")},
                          "stages": [{"type": "quantize", "method": "minmax"},
                                     {"type": "export"}]}))
    assert not (tmp_path / "o2").exists()


def test_recipe_export_writes_the_openvino_ir(tmp_path):
    """openvino_ir: export/model.{xml,bin} beside the ONNX file, checked in OpenVINO against
    PyTorch (the record's result has OpenVINO's parity and the ONNX file's own)."""
    import os

    import pytest

    from slimformer.errors import ConfigError
    from slimformer.export.openvino import openvino_available

    with pytest.raises(ConfigError, match="openvino_ir: the IR is converted from the openvino"):
        parse_recipe({"model": {"source": "zoo", "name": "vit-digits-seq"},
                      "stages": [{"type": "export", "openvino_ir": True, "target": "tensorrt"}]})
    if not openvino_available() and not os.environ.get("CI"):
        pytest.skip("openvino is not installed")
    out = tmp_path / "out"
    rep = run(parse_recipe({
        "model": {"source": "zoo", "name": "vit-digits-seq"}, "output": {"dir": str(out)},
        "stages": [{"type": "export", "openvino_ir": True, "target": "openvino",
                    "evaluate": False, "latency_batch_sizes": []}]})).report
    res = rep.stages[0].result
    assert res["path"] == "export/model.xml" and res["onnx"]["path"] == "export/model.onnx"
    assert all((out / "export" / f).is_file() for f in ("model.xml", "model.bin", "model.onnx"))
    assert set(res["parity"]) == {"traced", "other"} and set(res["onnx"]["parity"]) == {
        "traced", "other"}
    assert min(p["cosine"] for p in res["parity"].values()) > 0.9999  # OpenVINO f32 vs PyTorch
    assert res["onnx"]["form"]["target"] == "openvino"
