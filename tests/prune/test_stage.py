"""The prune stage in recipes: order checks, prune -> quantize -> evaluate, artifacts, CLI."""

import json

import pytest
from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.errors import ConfigError
from slimformer.pipeline import run
from slimformer.prune import load_pruned
from slimformer.quantize.serialize import load_quantized
from slimformer.recipe import load_recipe, parse_recipe

FAST = {"type": "prune", "method": "magnitude", "finetune_steps": 2, "batch_size": 8}


def test_recipe_validation():
    r = load_recipe("recipes/vit-fmnist-prune.yaml")
    assert [s.type for s in r.stages][:3] == ["evaluate", "prune", "evaluate"]
    assert r.stages[1].prune_config().ratio == 0.5
    with pytest.raises(ConfigError, match=r"stages\[1\]: prune must come before quantize"):
        parse_recipe({"stages": [{"type": "quantize"}, {"type": "prune"}]})
    with pytest.raises(ConfigError) as e:
        parse_recipe({"stages": [{"type": "prune", "ratio": 1.5, "structures": ["rows"],
                                  "bogus": 1}]})
    text = str(e.value)
    assert "stages[0].ratio: Input should be less than 1" in text
    assert "unknown structure(s) ['rows']; allowed: heads, dims, mlp" in text
    assert "stages[0].bogus: unknown key" in text


@pytest.mark.slow
def test_prune_then_quantize(tmp_path):
    r = parse_recipe({"name": "p", "data": {"eval_limit": 200, "batch_size": 100},
                      "stages": [FAST, {"type": "quantize", "method": "minmax", "save": True},
                                 {"type": "evaluate", "latency_batch_sizes": [2],
                                  "latency_repeats": 2}],
                      "output": {"dir": str(tmp_path / "out")}})
    res = run(r)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    prune_m = rep["stages"][0]["metrics"]
    assert prune_m["prunable_params_reduction"] == pytest.approx(2.0, rel=0.01)
    assert prune_m["heads_kept"] == "12/24" and prune_m["params_after"] < 520_000
    assert rep["stages"][2]["metrics"]["accuracy"] > 0.5
    assert rep["stages"][2]["size"]["macs_per_sample"] < 9_000_000
    assert res.report.stages[1].type == "quantize"
    loaded = load_pruned(tmp_path / "out" / "pruned")
    assert sum(p.numel() for p in loaded.module.parameters()) == prune_m["params_after"]
    q = load_quantized(tmp_path / "out" / "quantized")  # the pruned shapes, quantized
    assert q.model.blocks[0].attn.heads == 2  # vit-fmnist: 4 heads -> 2




def test_cli_prune_bad_ratio_and_help(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["prune", "vit-fmnist", "--out", str(tmp_path / "p"),
                              "--ratio", "1.2"])
    assert res.exit_code == 2
    assert "ratio: Input should be less than 1" in res.output
    assert not (tmp_path / "p").exists()
    res = runner.invoke(app, ["prune", "vit-fmnist", "--out", str(tmp_path / "p"),
                              "--score", "fisher"])
    assert res.exit_code == 2 and "score: Input should be 'gradient' or 'taylor'" in res.output
    res = runner.invoke(app, ["prune", "--help"])
    assert res.exit_code == 0 and "upop | magnitude" in res.output
