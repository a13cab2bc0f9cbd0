"""The hls recipe stage and the ``slimformer export hls`` command (no compile: fast)."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.errors import ConfigError
from slimformer.recipe import load_recipe

runner = CliRunner()
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "vit-digits-seq-hls.yaml"


def test_export_hls_help():
    for cmd in (["export", "--help"], ["export", "hls", "--help"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0 and "Usage" in res.output, res.output
    assert "--reuse-factor" in runner.invoke(app, ["export", "hls", "--help"]).output


def test_hls_stage_options_are_validated(tmp_path):
    rec = load_recipe(RECIPE)
    assert rec.stages[-1].type == "hls" and rec.stages[-1].hls_config().clock_mhz == 200
    bad = yaml.safe_load(RECIPE.read_text())
    bad["stages"][-1].update(backend="Quartus", io_type="io_stream", reuse_factor=0, colour=1)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    text = "\n".join(e.value.problems)
    for want in ("backend", "io_type", "reuse_factor", "colour"):
        assert want in text
    assert "Vivado" in text and "Vitis" in text  # the allowed values


def test_export_hls_cli_writes_a_project_without_compiling(tmp_path):
    out = tmp_path / "prj"
    res = runner.invoke(app, ["export", "hls", "vit-digits-seq", "--out", str(out), "--no-csim",
                              "--backend", "Vivado", "--clock-ns", "4"])
    assert res.exit_code == 0, res.output
    assert (out / "hls" / "firmware" / "myproject.cpp").is_file()  # the one-stage recipe's
    assert (out / "quantized" / "slimformer.json").is_file()  # the model the project was built from
    assert "estimate_latency_us" in res.output and "vivado_hls -f build_prj.tcl" in res.output
    assert f"cd {out / 'hls'} " in res.output  # the synthesis command names the real folder


def test_export_hls_bad_reuse_pattern_is_a_config_error(tmp_path):
    from slimformer.data.datasets import get_dataset
    from slimformer.hardware.api import build_hls
    from slimformer.hardware.config import HlsConfig
    from slimformer.models.zoo import load_zoo_model

    cfg = HlsConfig(reuse_overrides=[{"pattern": "blocks.*.fc1", "reuse_factor": 4},
                                     {"pattern": "nothing.*", "reuse_factor": 2}])
    with pytest.raises(ConfigError, match="nothing"):
        build_hls(load_zoo_model("vit-digits-seq"), cfg, tmp_path / "p",
                  get_dataset("digits-seq", "calib"), compile=False)


def test_recipe_runs_the_hls_stage_without_csim(tmp_path):
    from slimformer.pipeline import run

    data = yaml.safe_load(RECIPE.read_text())
    data["stages"] = [s for s in data["stages"] if s["type"] != "evaluate"]
    data["stages"][-1]["csim"] = False
    data["data"] = {"eval_limit": 50}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run(load_recipe(path), out_dir=tmp_path / "run")
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    hls = next(s for s in rep["stages"] if s["type"] == "hls")
    assert hls["metrics"]["estimate_latency_us"] < 2.0
    assert (tmp_path / "run" / "hls" / "firmware" / "myproject.cpp").is_file()
    assert result is not None
