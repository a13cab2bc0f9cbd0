"""The zoo: committed weights match their hash and recorded metric; training is reproducible."""

import shutil

import pytest
import torch

from slimformer.data.datasets import get_dataset
from slimformer.errors import ModelLoadError
from slimformer.models import zoo
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.models.structure import discover
from slimformer.pipeline import evaluate_model

# lower bounds well below the recorded metrics: a broken model or data pipeline falls far below
FLOORS = {"vit-fmnist": 0.85, "minilm-vader": 0.70, "minilm-trec": 0.80, "clip-fmnist": 0.75,
          "vit-digits-seq": 0.90}


def test_every_zoo_model_has_a_floor():
    assert set(FLOORS) == set(zoo.ZOO)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_weights_match_card(name):
    c = zoo.card(name)
    assert zoo.sha256(zoo.weights_path(name)) == c["sha256"]
    model = zoo.load_zoo_model(name)
    assert sum(p.numel() for p in model.parameters()) == c["params"]


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_full_test_set_reproduces_recorded_metric(name):
    entry = zoo.get_entry(name)
    lm = load_model(ZooSpec(name=name))
    ds = get_dataset(entry.dataset, "test")
    preds, labels = evaluate_model(lm.module, ds, 500)
    acc = float((preds == labels).float().mean())
    assert len(labels) == zoo.card(name).get("test_rows", len(labels))
    assert acc == pytest.approx(zoo.card(name)["fp32_metric"], abs=2e-4)
    assert acc > FLOORS[name]


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_structure_of_zoo_models(name):
    lm = load_model(ZooSpec(name=name))
    s = discover(lm.module, lm.example_inputs(2))
    expected_attention = {"vit-fmnist": 6, "minilm-vader": 6, "minilm-trec": 6,
                          "clip-fmnist": 12, "vit-digits-seq": 2}[name]
    assert len(s.attention) == expected_attention
    assert len(s.mlps) == expected_attention


def test_clip_both_towers_and_unseen_prompts():
    lm = load_model(ZooSpec(name="clip-fmnist"))
    s = discover(lm.module, lm.example_inputs(2))
    towers = {a.module.split(".")[0] for a in s.attention}
    assert towers == {"text_encoder", "image_encoder"}
    text_heads = {a.heads for a in s.attention if a.module.startswith("text_encoder")}
    assert text_heads == {12}
    by_template = zoo.card("clip-fmnist")["zero_shot_by_templates"]
    assert by_template["held_out_templates"] > 0.7  # prompts never seen in training


def test_digits_model_uses_only_hls_friendly_ops():
    from slimformer.models.trace import record

    lm = load_model(ZooSpec(name="vit-digits-seq"))
    graph, _ = record(lm.module, lm.example_inputs(2))
    compute = {n.op for n in graph.nodes} - {"reshape", "getitem", "mean"}
    assert compute <= {"linear", "add", "layer_norm", "einsum", "mul", "softmax", "relu"}
    assert sum(p.numel() for p in lm.module.parameters()) < 10_000


def test_training_is_deterministic_from_its_seed(tmp_path):
    a = zoo.train_zoo_model("vit-fmnist", tmp_path / "a", max_steps=3, eval_limit=256)
    b = zoo.train_zoo_model("vit-fmnist", tmp_path / "b", max_steps=3, eval_limit=256)
    assert a["sha256"] == b["sha256"] and a["train"]["steps"] == 3
    assert (tmp_path / "a" / "vit-fmnist.safetensors").is_file()


def test_text_weights_hold_only_the_head(tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(zoo.weights_path("minilm-trec")))
    assert set(state) == {"head.weight", "head.bias"}
    assert zoo.card("minilm-trec")["base_sha256"] == zoo._base_hash(zoo.get_entry("minilm-trec"))


def test_tampered_weights_are_refused(tmp_path, monkeypatch):
    for suffix in (".safetensors", ".json"):
        shutil.copy(zoo.WEIGHTS_DIR / f"vit-fmnist{suffix}", tmp_path / f"vit-fmnist{suffix}")
    with open(tmp_path / "vit-fmnist.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="do not match the recorded SHA-256"):
        zoo.load_zoo_model("vit-fmnist")


def test_unknown_zoo_model():
    with pytest.raises(ModelLoadError, match="the zoo has: clip-fmnist"):
        zoo.get_entry("bert-large")


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_models_load_in_eval_mode(name):
    lm = load_model(ZooSpec(name=name))
    assert not any(m.training for m in lm.module.modules())
    x = lm.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(lm.module(**x), lm.module(**x))
