"""Artifact manifests: the base model's paths load from any working directory."""

import json

import yaml
from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.models.loading import saved_model_spec
from slimformer.models.spec import HfDirSpec


def _bert_dir(folder):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2, max_position_embeddings=64)).save_pretrained(folder)


def test_saved_folder_records_absolute_paths_and_loads_elsewhere(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    _bert_dir(work / "models" / "b")
    recipe = work / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "rel", "model": {"source": "hf_dir", "path": "models/b"},  # typed relative
        "data": {"dataset": "vader-movie", "eval_limit": 16},
        "stages": [{"type": "quantize", "method": "minmax", "calib_samples": 8}],
        "output": {"dir": "out"}}))
    monkeypatch.chdir(work)
    runner = CliRunner()
    res = runner.invoke(app, ["run", "r.yaml"])
    assert res.exit_code == 0, res.output
    meta = json.loads((work / "out" / "quantized" / "slimformer.json").read_text())
    assert meta["model_spec"]["path"] == str(work / "models" / "b")
    monkeypatch.chdir(tmp_path)  # another working directory
    res = runner.invoke(app, ["inspect", str(work / "out"), "--json"])
    assert res.exit_code == 0, res.output


def test_old_relative_paths_are_found_beside_the_saved_folder(tmp_path, monkeypatch):
    saved = tmp_path / "run" / "quantized"
    (saved / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spec = saved_model_spec({"source": "hf_dir", "path": "base"}, str(saved / "slimformer.json"))
    assert spec == HfDirSpec(path=str(saved / "base"))  # not in the working dir: beside it
    (tmp_path / "base").mkdir()
    spec = saved_model_spec({"source": "hf_dir", "path": "base"}, str(saved / "slimformer.json"))
    assert spec.path == "base"  # as typed, from the working directory, first
