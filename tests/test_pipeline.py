"""The pipeline: load, discover, evaluate, report; bad input fails clearly and writes nothing."""

import json

import pytest

from slimformer.errors import DataError, UnsupportedModelError
from slimformer.pipeline import run
from slimformer.recipe import parse_recipe


def _recipe(tmp_path, **over):
    base = {"name": "t", "data": {"eval_limit": 300, "batch_size": 100},
            "stages": [{"type": "evaluate", "latency_batch_sizes": [1, 4], "latency_repeats": 2}],
            "output": {"dir": str(tmp_path / "out")}}
    return parse_recipe({**base, **over})


def test_run_writes_report(tmp_path):
    res = run(_recipe(tmp_path))
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["stages"][0]["metrics"]["samples"] == 300
    assert rep["stages"][0]["metrics"]["agreement"] == 1.0
    assert rep["stages"][0]["metrics"]["accuracy"] > 0.8
    assert set(rep["stages"][0]["latency"]) == {"batch=1", "batch=4"}
    assert rep["structure"]["attention_sites"] == 6 and rep["seeds"] == {"recipe": 0}
    assert rep["recipe"]["name"] == "t" and res.report.model["params"] > 1e6
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000


def test_data_that_does_not_fit_the_model(tmp_path):
    r = _recipe(tmp_path, model={"source": "timm", "name": "vit_tiny_patch16_224",
                                 "kwargs": {"img_size": 32, "depth": 1}},
                data={"dataset": "fashion-mnist", "eval_limit": 10})
    with pytest.raises(DataError, match="data does not fit the model") as e:
        run(r)
    assert "(2, 1, 28, 28)" in str(e.value)  # says what it got
    assert not (tmp_path / "out").exists()


def test_model_without_attention_runs_and_a_stage_needing_it_refuses(tmp_path):
    import numpy as np

    model = {"source": "factory", "factory": "tests.models.test_structure_variants:fourier_net",
             "inputs": {"x": {"shape": [1, 16, 16]}}}  # Fourier token mixing and MLPs
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((64, 16, 16)).astype("float32"),
             labels=rng.integers(0, 3, 64))
    data = {"source": str(tmp_path / "d.npz"), "batch_size": 16}
    run(_recipe(tmp_path, model=model, data=data))
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["structure"]["attention_sites"] == 0
    assert rep["structure"]["attention_kinds"].startswith("none found")
    stages = [{"type": "quantize", "method": "minmax", "softmax": "log_sqrt2"}]
    with pytest.raises(UnsupportedModelError, match="no attention was found"):
        run(_recipe(tmp_path, model=model, data=data, stages=stages,
                    output={"dir": str(tmp_path / "out2")}))
    assert not (tmp_path / "out2").exists()


def test_recipe_quantize_stage_then_evaluate(tmp_path):
    r = _recipe(tmp_path, model={"source": "zoo", "name": "vit-digits-seq"},
                stages=[{"type": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 2},
                        {"type": "quantize", "method": "repq", "weight_bits": 6, "act_bits": 6},
                        {"type": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 2}])
    res = run(r)
    s = res.report.stages
    assert [x.type for x in s] == ["evaluate", "quantize", "evaluate"]
    assert s[1].metrics["calib_samples"] == 128 and s[1].notes
    assert s[2].metrics["agreement"] > 0.9
    from slimformer.quantize.serialize import load_quantized

    assert load_quantized(tmp_path / "out" / "quantized") is not None


def test_failed_run_leaves_no_temporary_folders(tmp_path, monkeypatch):
    import tempfile

    from slimformer.errors import HardwareError

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    r = _recipe(tmp_path, stages=[
        {"type": "export", "check": False, "lint": False, "evaluate": False,
         "latency_batch_sizes": [1], "latency_repeats": 1},
        {"type": "hls", "csim": False}])  # vit-fmnist has GELU: hls4ml lowering refuses it
    with pytest.raises(HardwareError, match="gelu|GELU"):
        run(r)
    # the export's and the hls stage's folders are gone (torch may keep its own cache there)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("slimformer-")] == []
    assert not (tmp_path / "out").exists()
