"""The zoo: committed weights match their hash and recorded metric; training is reproducible."""

import shutil

import pytest

from slimformer.errors import ModelLoadError
from slimformer.models import zoo
from slimformer.pipeline import evaluate_model


def test_weights_match_card_hash_and_params():
    c = zoo.card("vit-fmnist")
    assert zoo.sha256(zoo.weights_path("vit-fmnist")) == c["sha256"]
    model = zoo.load_zoo_model("vit-fmnist")
    assert sum(p.numel() for p in model.parameters()) == c["params"]
    assert 1_000_000 <= c["params"] <= 5_000_000


def test_full_test_set_reproduces_recorded_accuracy():
    from slimformer.data.datasets import get_dataset

    model = zoo.load_zoo_model("vit-fmnist")
    preds, labels = evaluate_model(model, get_dataset("fashion-mnist", "test"), 500)
    acc = float((preds == labels).float().mean())
    assert len(labels) == 10_000
    assert acc == pytest.approx(zoo.card("vit-fmnist")["fp32_metric"], abs=2e-4)
    assert acc > 0.85


def test_training_is_deterministic_from_its_seed(tmp_path):
    a = zoo.train_zoo_model("vit-fmnist", tmp_path / "a", max_steps=3, eval_limit=256)
    b = zoo.train_zoo_model("vit-fmnist", tmp_path / "b", max_steps=3, eval_limit=256)
    assert a["sha256"] == b["sha256"] and a["train"]["steps"] == 3
    assert (tmp_path / "a" / "vit-fmnist.safetensors").is_file()


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
    with pytest.raises(ModelLoadError, match="the zoo has: vit-fmnist"):
        zoo.get_entry("bert-large")
