"""Hugging Face tasks: the class a task loads, tasks read from the class, missing head weights."""

import pytest
import torch

from slimformer.errors import ConfigError, ModelLoadError
from slimformer.models.hf import resolve_task
from slimformer.models.loading import load_hf_folder, load_model, parse_model_arg
from slimformer.models.spec import HfConfigSpec, HfDirSpec

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=100, max_position_embeddings=64)


@pytest.fixture(scope="module")
def bert_base_dir(tmp_path_factory):
    """A tiny BERT saved as BertModel (encoder weights only, like a sentence-transformers folder)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert-base")
    BertModel(BertConfig(**TINY)).save_pretrained(folder)
    return folder


def test_masked_lm_on_encoder_weights_is_refused_naming_the_missing_keys(bert_base_dir):
    with pytest.raises(ModelLoadError) as e:
        load_hf_folder(bert_base_dir, "masked-lm")
    msg = str(e.value)
    assert "cls.predictions" in msg and "missing" in msg and "--task base" in msg
    assert "more" in msg  # a few keys named, then a count


def test_config_naming_a_head_without_its_weights_is_refused_on_auto(bert_base_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(bert_base_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ModelLoadError, match="--task base"):
        load_model(HfDirSpec(path=str(folder)))
    lm = load_model(parse_model_arg(str(folder), task="sentence-embedding"))
    assert lm.task == "sentence-embedding" and type(lm.module).__name__ == "BertModel"


def test_base_folder_loads_as_each_base_task(bert_base_dir):
    from transformers import BertModel

    for task in ("auto", "base", "sentence-embedding"):
        m = load_hf_folder(bert_base_dir, task)
        assert type(m) is BertModel and not m.training
    ref = load_hf_folder(bert_base_dir, "base")
    x = torch.randint(0, 100, (1, 8))
    with torch.no_grad():  # the saved weights, not random ones
        assert torch.equal(m(input_ids=x).last_hidden_state, ref(input_ids=x).last_hidden_state)


def test_task_read_from_the_class():
    gpt2 = load_model(HfConfigSpec(model_type="gpt2", task="causal-lm", config=dict(
        n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=32))).module
    assert resolve_task("auto", gpt2) == "causal-lm"
    bert = load_model(HfConfigSpec(model_type="bert", config=TINY)).module
    assert resolve_task("auto", bert) == "base"
    assert resolve_task("image-features", bert) == "image-features"


def test_task_option_only_for_hugging_face_models(bert_base_dir):
    assert parse_model_arg("hf:bert", task="masked-lm").task == "masked-lm"
    assert parse_model_arg(str(bert_base_dir), task="base").task == "base"
    with pytest.raises(ConfigError, match="Hugging Face folder"):
        parse_model_arg("vit-fmnist", task="base")
    with pytest.raises(ConfigError, match="allowed: auto, base"):
        parse_model_arg(str(bert_base_dir), task="embedding")
