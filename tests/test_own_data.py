"""Your own model and your own data, end to end through the CLI, each command chained."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.data.text import minilm_path

runner = CliRunner()


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.slow
def test_local_hf_text_model_with_a_csv(tmp_path):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = minilm_path()
    model_dir = tmp_path / "my-bert"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    for f in tok.iterdir():  # the model's own tokenizer, as a user's folder has it
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, model_dir / f.name)
    rows = [("a wonderful, moving film", "pos"), ("dull and far too long", "neg")] * 40
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    out = _cli("eval", model_dir, "--data", csv, "--repeats", "1", "--json")
    data = json.loads(out[out.index("{"):])
    assert data["samples"] == 80 and data["accuracy"] is not None  # eval calibrates nothing
    _cli("quantize", model_dir, "--data", csv, "--out", tmp_path / "q", "--calib-samples", "32")
    onnx = tmp_path / "q.onnx"
    _cli("export", "onnx", tmp_path / "q", "--out", onnx)
    assert onnx.stat().st_size > 10_000


@pytest.mark.slow
def test_image_model_with_an_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from slimformer.data.fashion_mnist import load_arrays

    images, labels = load_arrays("test")
    folder = tmp_path / "photos"
    for i in range(60):  # real Fashion-MNIST images as PNG files in class sub-folders 0/ ... 9/
        d = folder / str(labels[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(images[i], dtype=np.uint8)).save(d / f"{i}.png")
    out = _cli("eval", "vit-digits-seq", "--help")  # the CLI is up
    assert "--data" in out
    res = runner.invoke(app, ["quantize", "vit-fmnist", "--data", str(folder), "--out",
                              str(tmp_path / "q"), "--calib-samples", "16"])
    assert res.exit_code == 2 and "give the preprocessing" in res.output  # no processor config
    spec = json.dumps({"path": str(folder), "size": 28, "mean": [0.2860], "std": [0.3530],
                       "channels": 1})  # the zoo model's own normalization
    res = runner.invoke(app, ["quantize", "vit-fmnist", "--data", spec, "--out",
                              str(tmp_path / "q"), "--calib-samples", "16"])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and (tmp_path / "q" / "quantized" / "slimformer.json").is_file()
    out = _cli("eval", "vit-fmnist", "--eval-data", spec, "--repeats", "1", "--json")
    assert json.loads(out[out.index("{"):])["accuracy"] > 0.7  # folder n is class n
    for d in folder.iterdir():  # folder names the model does not know: refused, both listed
        shutil.copytree(d, tmp_path / "named" / f"class{d.name}")
    res = runner.invoke(app, ["eval", "vit-fmnist", "--data", spec.replace(str(folder),
                              str(tmp_path / "named"))])
    assert res.exit_code == 2 and "class0" in res.output and "T-shirt/top" in res.output


def test_recipe_base_model_without_labels_reports_fidelity(tmp_path):
    """A base model (no logits) on unlabelled text: every stage reports output fidelity."""
    from slimformer.pipeline import run
    from slimformer.recipe import parse_recipe

    txt = tmp_path / "lines.txt"
    txt.write_text("".join(f"sentence number {i} about {w}\n"
                           for i, w in enumerate(["cats", "dogs", "stars", "rivers"] * 12)))
    r = parse_recipe({
        "name": "base", "model": {"source": "hf_config", "model_type": "bert", "task": "base",
                                  "config": {"hidden_size": 32, "num_hidden_layers": 1,
                                             "num_attention_heads": 2,
                                             "intermediate_size": 64}},
        "data": {"source": {"path": str(txt), "tokenizer": str(minilm_path()),
                            "max_length": 16}, "calib_rows": 16},
        "stages": [{"type": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 1},
                   {"type": "quantize", "method": "minmax", "calib_samples": 16},
                   {"type": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 1}],
        "output": {"dir": str(tmp_path / "out")}})
    res = run(r)
    first, _, after = res.report.stages
    assert "accuracy" not in first.metrics and first.metrics["samples"] == 48 - 16
    assert first.metrics["outputs"] == 2  # last_hidden_state and pooler_output
    assert first.metrics["output_sqnr_db_min"] > 100  # the float model against itself
    assert 15 < after.metrics["output_sqnr_db_min"] < 100  # W8A8 vs float, every output
