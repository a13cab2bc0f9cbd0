"""Model loading: zoo, HF directory, HF inline config, timm, factory + safetensors; clear errors."""

import pytest
import torch
from safetensors.torch import save_file

from slimformer.errors import ConfigError, ModelLoadError
from slimformer.models import spec as S
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model, parse_model_arg


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_hf_dir_round_trip(tmp_path):
    src = load_model(GENERALITY["bert"])
    src.module.save_pretrained(tmp_path / "bert")
    again = load_model(parse_model_arg(str(tmp_path / "bert")))
    assert type(again.module).__name__ == "BertForSequenceClassification"  # from architectures
    x = src.example_inputs(3)
    with torch.no_grad():
        assert torch.equal(src.module(**x).logits, again.module(**x).logits)


def test_hf_inline_config_is_seeded():
    a, b = load_model(GENERALITY["vit"]), load_model(GENERALITY["vit"])
    x = a.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(a.module(**x).last_hidden_state, b.module(**x).last_hidden_state)
    assert x["pixel_values"].shape == (2, 3, 32, 32)


def test_timm_by_name_never_pretrained():
    lm = load_model(parse_model_arg("timm:vit_tiny_patch16_224",
                                    '{"img_size": 32, "patch_size": 8, "depth": 1}'))
    assert lm.example_inputs(1)["x"].shape == (1, 3, 32, 32)
    assert lm.module(**lm.example_inputs(1)).shape == (1, 1000)


def test_factory_with_safetensors_weights(tmp_path):
    spec = GENERALITY["torch-encoder"]
    first = load_model(spec)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in first.module.state_dict().items()}, str(path))
    again = load_model(spec.model_copy(update={"weights": str(path), "seed": 123}))
    x = first.example_inputs(2)
    with torch.no_grad():
        assert _cos(first.module(**x), again.module(**x)) > 0.999999
        assert torch.equal(first.module(**x), again.module(**x))


def test_safetensors_keys_that_do_not_match(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"encoder.nope": torch.zeros(3), "head.weight": torch.zeros(5, 5)}, str(path))
    spec = GENERALITY["torch-encoder"].model_copy(update={"weights": str(path)})
    with pytest.raises(ModelLoadError) as e:
        load_model(spec)
    msg = str(e.value)
    assert "missing keys" in msg and "unexpected keys ['encoder.nope']" in msg
    assert "head.weight: model (10, 64) vs file (5, 5)" in msg


def test_missing_weights_file():
    spec = GENERALITY["torch-encoder"].model_copy(update={"weights": "/nonexistent/w.safetensors"})
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(spec)


def test_model_path_that_does_not_exist():
    with pytest.raises(ModelLoadError, match="not a zoo model, an existing directory"):
        parse_model_arg("/no/such/dir")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(S.HfDirSpec(path="/tmp"))


@pytest.mark.parametrize("factory,match", [
    ("no_such_pkg.mod:build", "cannot import module 'no_such_pkg.mod'"),
    ("slimformer.models.generic:nope", "has no attribute 'nope'"),
    ("slimformer.models.generic:EncoderClassifier", "raised TypeError"),
])
def test_factory_that_does_not_import(factory, match):
    kwargs = {"bogus": 1} if "EncoderClassifier" in factory else {}
    with pytest.raises(ModelLoadError, match=match):
        load_model(S.FactorySpec(factory=factory, kwargs=kwargs))


def test_bad_hf_config():
    with pytest.raises(ModelLoadError, match="model_type 'no-such-arch'"):
        load_model(S.HfConfigSpec(model_type="no-such-arch"))


def test_spec_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model:\n  source: factory\n  factory: slimformer.models.generic:torch_encoder\n"
                    "  inputs: {src: {shape: [1, 4, 64]}}\n")
    assert load_model(parse_model_arg(str(path))).example_inputs(2)["src"].shape == (2, 4, 64)
    path.write_text("model:\n  source: factory\n  factory: x:y\n  inputz: 1\n")
    with pytest.raises(ConfigError, match="inputz: unknown key"):
        parse_model_arg(str(path))


def test_inputs_cannot_be_inferred():
    with pytest.raises(ModelLoadError, match="give them in the model spec"):
        load_model(S.FactorySpec(factory="slimformer.models.generic:torch_encoder"))
