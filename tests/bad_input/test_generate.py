"""``slimformer generate`` with bad input: bounded options, no chat template, not a causal LM."""

import pytest

from tests.stages.test_generate import build_tiny_lm

from .conftest import no_traceback


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_lm")
    build_tiny_lm(folder)  # no chat template; 64 positions
    return folder


@pytest.mark.parametrize("args, what", [
    (["--temperature", "0"], "ConfigError: options is invalid (1 problem(s)):\n  - --temperature: "
                             "0.0 is out of range; allowed: 0.001 to 100"),
    (["--max-new-tokens", "0"], "--max-new-tokens: 0 is out of range; allowed: 1 to 4096"),
    (["--max-new-tokens", "5000"], "--max-new-tokens: 5000 is out of range"),
    (["--seed", "-1"], "--seed: -1 is out of range"),
    (["--max-new-tokens", "100"], "ConfigError: options is invalid (1 problem(s)):\n  - "
                                  "--max-new-tokens: the prompt's 4 tokens plus 100 new ones "
                                  "exceed the model's 64 positions; allowed: 1 to 60"),
    (["--chat"], "ConfigError: options is invalid (1 problem(s)):\n  - --chat (recipe: chat): "
                 "the model's tokenizer has no chat template"),
    (["--prompt", ""], "prompt: String should have at least 1 character"),
])
def test_bad_options_are_typed_errors(lm, cli, args, what):
    full = ["generate", lm, *args] if "--prompt" in args else \
        ["generate", lm, "--prompt", "the cat sat on", *args]
    res = cli(*full)
    assert res.exit_code == 2, res.output
    assert "error: ConfigError" in res.output and what in res.output, res.output
    no_traceback(res)


def test_not_a_causal_lm_is_refused(tmp_path, cli):
    """An encoder with a masked-LM head has logits over the vocabulary but is not causal."""
    from transformers import BertConfig, BertForMaskedLM

    build_tiny_lm(tmp_path)  # its tokenizer; the model is replaced by a BERT
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "generation_config.json").unlink()
    BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(
        tmp_path)
    res = cli("generate", tmp_path, "--prompt", "the cat sat on")
    assert res.exit_code == 2, res.output
    assert "error: UnsupportedModelError: BertForMaskedLM" in res.output, res.output
    assert "not a causal language model" in res.output
    no_traceback(res)


def test_a_model_without_tokenizer_is_a_data_error(tmp_path, cli):
    res = cli("generate", "hf:llama", "--config", '{"hidden_size": 32, "num_hidden_layers": 1, '
              '"num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 50}',
              "--prompt", "hi")
    assert res.exit_code == 2, res.output
    assert "error: DataError" in res.output and "--tokenizer FOLDER" in res.output, res.output
    no_traceback(res)
