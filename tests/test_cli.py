"""The CLI: help texts, validate, inspect, eval, zoo, run; errors exit 2 with a clear message."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.errors import ConfigError

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["run"], ["validate"], ["inspect"], ["eval"], ["zoo"], ["quantize"],
                                 ["qat"], ["zoo", "list"], ["zoo", "train"],
                                 ["zoo", "install"]])
def test_help(cmd):
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_validate_good_and_bad(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"name": "x"}))
    res = runner.invoke(app, ["validate", str(good)])
    assert res.exit_code == 0 and "valid" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"nam": "x", "seed": "one",
                                   "stages": [{"type": "evaluate", "latency_repeats": 0}]}))
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    for path in ("nam: unknown key", "seed: Input should be a valid integer",
                 "stages[0].latency_repeats"):
        assert path in res.output


def test_inspect_json():
    res = runner.invoke(app, ["inspect", "vit-fmnist", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert len(data["attention"]) == 6 and data["attention"][0]["heads"] == 4
    assert data["params"] > 1_000_000 and data["macs"] > 0


def test_inspect_table_for_hf_config():
    cfg = json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 64, "vocab_size": 100})
    res = runner.invoke(app, ["inspect", "hf:bert", "--config", cfg])
    assert res.exit_code == 0, res.output
    assert "Attention" in res.output and "encoder.layer.0.attention.self" in res.output


def test_eval_json():
    res = runner.invoke(app, ["eval", "vit-fmnist", "--data", "fashion-mnist", "--limit", "200",
                              "--repeats", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):])
    assert data["samples"] == 200 and data["accuracy"] > 0.8
    assert set(data["latency"]) == {"batch=1", "batch=32"}


def test_zoo_list():
    res = runner.invoke(app, ["zoo", "list"])
    assert res.exit_code == 0 and "vit-fmnist" in res.output


def test_run_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "cli", "data": {"eval_limit": 100},
        "stages": [{"type": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 2}],
        "output": {"dir": str(tmp_path / "out")}}))
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "report.md").is_file() and "report written" in res.output


def test_errors_exit_2_with_message():
    res = runner.invoke(app, ["inspect", "/no/such/model"])
    assert res.exit_code == 2 and "ModelLoadError" in res.output
    res = runner.invoke(app, ["eval", "vit-fmnist", "--data", "imagenet"])
    assert res.exit_code == 2
    assert ("is no built-in data set (digits-seq, fashion-mnist, nyt-editorials, trec, "
            "vader-movie)") in res.output


def test_quantize_command(tmp_path):
    res = runner.invoke(app, ["quantize", "vit-digits-seq", "--method", "repq", "--weight-bits",
                              "6", "--act-bits", "6", "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and (tmp_path / "q" / "quantized" / "slimformer.json").is_file()
    # the stage record counts quantized and float parameters, and the notes say why
    rec = next(s for s in json.loads((tmp_path / "q" / "report.json").read_text())["stages"]
               if s["type"] == "quantize")
    m = rec["metrics"]
    assert 0 < m["weights_quantized"] < m["weights_total"] == m["weights_quantized"] + m[
        "weights_float"]
    assert any(n.startswith(f"weights quantized: {m['weights_quantized']:,} of ") for n in
               rec["notes"])
    res = runner.invoke(app, ["quantize", "vit-digits-seq", "--weight-bits", "12", "--out",
                              str(tmp_path / "bad")])
    assert res.exit_code == 2 and "weight_bits: must be 2..8, got 12" in res.output
    assert not (tmp_path / "bad").exists()


def test_quantize_act_dynamic(tmp_path):
    res = runner.invoke(app, ["quantize", "vit-digits-seq", "--act-dynamic", "token", "--out",
                              str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    rec = next(s for s in json.loads((tmp_path / "q" / "report.json").read_text())["stages"]
               if s["type"] == "quantize")
    assert rec["config"]["act_dynamic"] == "token" and rec["config"]["method"] == "minmax"
    res = runner.invoke(app, ["quantize", "vit-digits-seq", "--act-dynamic", "token",
                              "--weight-only", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "act_dynamic token" in res.output and "weight_only" in \
        res.output
    assert not (tmp_path / "bad").exists()


def test_quantize_at_4_activation_bits_defaults_to_per_token_ranges_and_says_so(tmp_path):
    res = runner.invoke(app, ["quantize", "vit-digits-seq", "--weight-bits", "4", "--act-bits",
                              "4", "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    assert "vit-digits-seq minmax W4A4 (run-time ranges per token)" in res.output
    rec = next(s for s in json.loads((tmp_path / "q" / "report.json").read_text())["stages"]
               if s["type"] == "quantize")
    assert rec["config"]["act_dynamic"] == "token" and rec["config"]["method"] == "minmax"
    assert rec["notes"][0].startswith("act_dynamic token: the default for activations of 4 bits")
    res = runner.invoke(app, ["quantize", "vit-digits-seq", "--method", "repq", "--weight-bits",
                              "4", "--act-bits", "4", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    rec = next(s for s in json.loads((tmp_path / "r" / "report.json").read_text())["stages"]
               if s["type"] == "quantize")
    assert (rec["config"]["act_dynamic"], rec["config"]["method"]) == ("off", "repq")


STAGE_COMMANDS = {"quantize": "QuantizeStage", "prune": "PruneStage", "search": "SearchStage",
                  "hls": "HlsStage", "qat": "QatStage"}


@pytest.mark.parametrize("stage", sorted(STAGE_COMMANDS))
def test_every_recipe_option_of_a_stage_is_reachable_from_its_command(stage):
    import importlib

    from slimformer.cli import _stage

    cls = getattr(importlib.import_module(f"slimformer.stages.{stage}"), STAGE_COMMANDS[stage])
    fields = [k for k in cls.model_fields if k not in ("type", "save")]
    base = {"storage": "j", "supernet_path": "s"} if stage == "search" else {}
    obj = cls(**base)
    # a quantize stage's dump leaves out what it fills in by default (method, task defaults)
    default = {k: getattr(obj, k) for k in fields} | obj.model_dump(mode="json")
    sets = [f"{k}={json.dumps(default[k])}" for k in fields]  # JSON is YAML
    assert _stage(cls, sets, **base).model_dump(mode="json") == default
    # and each one changes the stage: a wrong value is refused naming the option
    for k in fields:
        with pytest.raises(ConfigError, match=k):
            _stage(cls, [f"{k}={{not: [an, option]}}"], **base)
    help_text = runner.invoke(app, ["export", "hls", "--help"] if stage == "hls"
                              else [stage, "--help"]).output
    assert "--set" in help_text


def test_set_errors_name_the_key_and_the_allowed_options(tmp_path):
    res = runner.invoke(app, ["quantize", "vit-digits-seq", "--out", str(tmp_path / "q"),
                              "--set", "percentil=99.9"])
    assert res.exit_code == 2 and "percentil" in res.output and "percentile" in res.output
    res = runner.invoke(app, ["quantize", "vit-digits-seq", "--out", str(tmp_path / "q"),
                              "--set", "percentile"])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    res = runner.invoke(app, ["export", "hls", "vit-digits-seq", "--out", str(tmp_path / "h"),
                              "--float", "--set", "quantize.percentile=99"])
    assert res.exit_code == 2 and "nothing is quantized" in res.output
    assert not any(tmp_path.iterdir())


def test_set_reaches_the_recipe_of_the_run(tmp_path):
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", "vit-digits-seq", "--out", str(out), "--method",
                              "minmax", "--set", "method=percentile", "--set", "percentile=99.5",
                              "--set", "keep_float=['blocks.0.q.*']", "--set", "calib_samples=64"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    cfg = rep["stages"][1]["config"]
    assert (cfg["method"], cfg["percentile"], cfg["keep_float"]) == \
        ("percentile", 99.5, ["blocks.0.q.*"])
    assert rep["stages"][1]["metrics"]["calib_samples"] == 64  # the data follows the option


@pytest.mark.slow
def test_run_without_arguments_is_the_shipped_quickstart(tmp_path, monkeypatch):
    """`slimformer run` anywhere (no checkout there): quantizes within 1 point, runs it deployed."""

    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the packaged recipe is the default
    res = runner.invoke(app, ["--quiet", "run"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "runs" / "quickstart" / "report.json").read_text())
    assert [s["type"] for s in rep["stages"]] == ["evaluate", "quantize", "evaluate", "export"]
    ev0, _, ev1, ex = rep["stages"]
    assert ev0["metrics"]["accuracy"] - ex["metrics"]["accuracy"] <= 0.01
    assert ev0["size"]["bytes"] / ev1["size"]["bytes"] > 6
    headline = (tmp_path / "runs" / "quickstart" / "report.md").read_text().splitlines()[2]
    assert headline.startswith("**quickstart: 6.") and "ONNX Runtime" in headline
    assert {"onnxruntime batch=32", "onnxruntime float batch=32"} <= set(ex["latency"])
    # the checkout's recipes/quickstart.yaml is that same file
    checkout = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    assert checkout.resolve() == (Path(__file__).parents[1] / "src" / "slimformer" / "recipes"
                                  / "quickstart.yaml").resolve()


def _tiny_bert_classifier(tmp_path: Path) -> Path:
    """A spec file of a 1-layer random BERT sequence classifier (2 classes)."""
    spec = tmp_path / "m.yaml"
    spec.write_text(yaml.safe_dump({
        "source": "hf_config", "model_type": "bert", "task": "sequence-classification",
        "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "intermediate_size": 64, "num_labels": 2}}))
    return spec


def test_eval_unlabelled_data_scores_every_row_and_quantize_sets_some_aside(tmp_path):
    """eval on a file without labels says so (no accuracy) and scores all 400 rows (it
    calibrates nothing); quantize scores the 200 it does not calibrate on."""
    from slimformer.data.text import minilm_path

    spec = _tiny_bert_classifier(tmp_path)
    txt = tmp_path / "lines.txt"
    txt.write_text("".join(f"line {i} about {w}\n" for i, w in enumerate(["cats", "dogs"] * 200)))
    data = json.dumps({"path": str(txt), "tokenizer": str(minilm_path()), "max_length": 16})
    res = runner.invoke(app, ["eval", str(spec), "--data", data, "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "(400 samples): no labels: accuracy not measured" in " ".join(res.output.split())
    res = runner.invoke(app, ["eval", str(spec), "--data", data, "--repeats", "1", "--json"])
    got = json.loads(res.output[res.output.index("{"):])
    assert got["accuracy"] is None and got["samples"] == 400  # no row set aside
    res = runner.invoke(app, ["quantize", str(spec), "--data", data, "--method", "minmax",
                              "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    assert "(200 rows)" in " ".join(res.output.split())  # 200 calibrate, 200 are scored


def test_eval_of_an_own_labelled_file_scores_all_80_rows(tmp_path):
    """A run that calibrates nothing (eval) scores every row of the user's file: 80 of 80, the
    accuracy of the model over all of them (as the pipeline's own predictions give it)."""
    from slimformer.data.datasets import make_loader
    from slimformer.data.sources import load_source
    from slimformer.data.text import minilm_path
    from slimformer.models.evaluate import predict
    from slimformer.models.loading import load_model, parse_model_arg

    spec = _tiny_bert_classifier(tmp_path)
    csv = tmp_path / "reviews.csv"
    rows = [(f"review {i}: a wonderful film" if i % 2 else f"review {i}: dull", i % 2)
            for i in range(80)]
    csv.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    data = json.dumps({"path": str(csv), "tokenizer": str(minilm_path()), "max_length": 16})
    res = runner.invoke(app, ["eval", str(spec), "--data", data, "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output[res.output.index("{"):])
    assert got["samples"] == 80
    lm = load_model(parse_model_arg(str(spec)))
    ds = load_source(json.loads(data), lm.input_specs)
    preds, labels = predict(lm.module, make_loader(ds, 256))
    assert len(labels) == 80 and labels.tolist() == [y for _, y in rows]
    assert got["accuracy"] == float((preds == labels).float().mean())


def test_model_without_attention_in_every_command_that_fits(tmp_path):
    """Fourier token mixing (no attention): inspect, eval, quantize, prune mlp and export onnx
    work with a note; a softmax quantizer or head pruning asked for is refused with the cause."""
    import numpy as np

    spec = tmp_path / "fnet.json"
    spec.write_text(json.dumps({"source": "factory", "inputs": {"x": {"shape": [1, 16, 16]}},
                                "factory": "tests.models.test_structure_variants:fourier_net"}))
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((48, 16, 16)).astype("float32"),
             labels=rng.integers(0, 3, 48))
    m, d = str(spec), ["--data", str(data)]
    res = runner.invoke(app, ["inspect", m])
    assert res.exit_code == 0, res.output
    assert "note: no attention found" in res.output and "body.blocks.1.mlp.up.weight" in res.output
    res = runner.invoke(app, ["inspect", m, "--json"])
    assert json.loads(res.output[res.output.index("{"):])["attention"] == []
    res = runner.invoke(app, ["eval", m, *d, "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["quantize", m, *d, "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    rec = next(s for s in json.loads((tmp_path / "q" / "report.json").read_text())["stages"]
               if s["type"] == "quantize")
    assert any(n.startswith("no attention found: no softmax quantizer built") for n in rec["notes"])
    res = runner.invoke(app, ["quantize", m, *d, "--softmax", "uniform", "--out",
                              str(tmp_path / "q2")])
    assert res.exit_code == 2 and "UnsupportedModelError" in res.output
    assert "no attention was found" in res.output and not (tmp_path / "q2").exists()
    res = runner.invoke(app, ["prune", m, *d, "--out", str(tmp_path / "p2")])
    assert res.exit_code == 2 and "ConfigError" in res.output
    assert "the model has no heads" in res.output and "leave heads out of structures" in res.output
    res = runner.invoke(app, ["prune", m, *d, "--structures", "mlp", "--search-steps", "4",
                              "--finetune-steps", "0", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert "MLP units cut at 2 of 2 sites" in res.output
    res = runner.invoke(app, ["export", "onnx", m, "--out", str(tmp_path / "f.onnx")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f.onnx").is_file()


@pytest.fixture(scope="module")
def bare_bert(tmp_path_factory):
    """A tiny random BertModel folder: a base model without any head."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bare-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, vocab_size=100, max_position_embeddings=16)
              ).save_pretrained(folder)
    return folder


def test_task_option_reaches_the_loader_of_every_model_command(bare_bert, tmp_path):
    """--task on prune / search / export / generate: a missing head is refused, base loads."""
    out, onnx, xml = tmp_path / "o", tmp_path / "m.onnx", tmp_path / "m.xml"
    model = str(bare_bert)
    for cmd in (["prune", model, "--out", str(out)], ["search", model, "--out", str(out)],
                ["export", "hls", model, "--out", str(out), "--float"],
                ["export", "onnx", model, "--out", str(onnx)],
                ["export", "openvino", model, "--out", str(xml)],
                ["generate", model, "--prompt", "hi"]):
        res = runner.invoke(app, [*cmd, "--task", "causal-lm"])
        assert res.exit_code == 2, (cmd, res.output)
        assert "ModelLoadError" in res.output and "--task base" in res.output, (cmd, res.output)
        assert not out.exists() and not onnx.exists() and not xml.exists(), cmd  # nothing written
        res = runner.invoke(app, [*cmd, "--task", "segmentation"])
        assert res.exit_code == 2 and "'segmentation' is not a task" in res.output, cmd
    res = runner.invoke(app, ["export", "onnx", model, "--out", str(onnx), "--task", "base"])
    assert res.exit_code == 0, res.output
    assert onnx.is_file()


def test_eval_is_the_evaluate_stage_on_every_test_row(tmp_path):
    """eval runs the one-stage recipe evaluate: all rows of the test split (no row set aside),
    the same accuracy and rows as that recipe run through the pipeline."""
    from slimformer.data.datasets import get_dataset
    from slimformer.pipeline import run
    from slimformer.recipe import parse_recipe

    res = runner.invoke(app, ["eval", "vit-digits-seq", "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output[res.output.index("{"):])
    assert got["samples"] == len(get_dataset("digits-seq", "test")) == 497
    assert set(got["latency"]) == {"batch=1", "batch=32"} and got["size"]["params"] > 0
    rec = run(parse_recipe({"model": {"source": "zoo", "name": "vit-digits-seq"},
                            "stages": [{"type": "evaluate", "latency_batch_sizes": []}],
                            "output": {"dir": str(tmp_path / "r")}})).report.stages[0]
    assert (got["accuracy"], got["samples"]) == (rec.metrics["accuracy"], rec.metrics["samples"])
    assert got["accuracy"] > 0.9
