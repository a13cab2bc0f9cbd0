"""``slimformer generate`` and the ``generate`` stage on a tiny random Llama folder.

The folder holds a WordLevel tokenizer trained on a few sentences and a random LlamaForCausalLM;
it is quantized W8A8 through the CLI, and the saved folder generates like the live model: greedy
tokens with the KV cache equal those without it, and the float model's equal HF's generate().
"""

import importlib.util
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from slimformer.cli import app

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the capital of france is paris",
             "birds fly over the river", "she reads a book at night"]
PROMPT = "the cat sat on"


def build_tiny_lm(folder, chat_template: str | None = None) -> None:
    """A random 2-layer LlamaForCausalLM with a WordLevel tokenizer, saved as a HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_lm")
    build_tiny_lm(folder, chat_template="{% for m in messages %}<s> {{ m['content'] }} "
                                        "{% endfor %}")
    return folder


@pytest.fixture(scope="module")
def quantized(lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "run"
    res = CliRunner().invoke(app, ["-q", "quantize", str(lm), "--out", str(out), "--method",
                                   "minmax", "--calib-samples", "16", "--limit", "32"])
    assert res.exit_code == 0, res.output
    return out


def test_a_causal_lm_gets_per_token_activation_ranges_by_default(quantized, lm, tmp_path):
    """min/max on a causal LM: per-token run-time ranges unless the command says otherwise."""
    def record(out):
        rep = json.loads((out / "report.json").read_text())
        return next(s for s in rep["stages"] if s["type"] == "quantize")

    rec = record(quantized)
    assert rec["config"]["act_dynamic"] == rec["metrics"]["act_dynamic"] == "token"
    assert any(n.startswith("act_dynamic token: the default for a causal LM") for n in rec["notes"])
    out = tmp_path / "static"
    res = CliRunner().invoke(app, ["-q", "quantize", str(lm), "--out", str(out), "--method",
                                   "minmax", "--act-dynamic", "off", "--calib-samples", "16",
                                   "--limit", "32"])
    assert res.exit_code == 0, res.output
    rec = record(out)
    assert rec["config"]["act_dynamic"] == rec["metrics"]["act_dynamic"] == "off"
    assert not any(n.startswith("act_dynamic") for n in rec["notes"])


def _generate(*args):
    res = CliRunner().invoke(app, ["generate", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_float_greedy_equals_hf_generate(lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    got = _generate(lm, "--prompt", PROMPT, "--max-new-tokens", 12)
    model = AutoModelForCausalLM.from_pretrained(str(lm)).eval()
    ids = AutoTokenizer.from_pretrained(str(lm))(PROMPT, return_tensors="pt")["input_ids"]
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert got["new_ids"] == ref and got["prompt_tokens"] == ids.shape[1]
    assert got["new_tokens"] == len(ref) and got["decode_tokens_per_s"] > 0


def test_quantized_folder_generates_with_the_cache_as_without(quantized):
    """The saved W8A8 model: the CLI's tokens, cached and uncached, are the same."""
    from slimformer.models.loading import parse_model_arg
    from slimformer.quantize.state import QuantizedModel
    from slimformer.stages.artifact import load
    from slimformer.stages.generate import GenerateStage, generate_text

    got = _generate(quantized, "--prompt", PROMPT, "--max-new-tokens", 12)
    r = load(parse_model_arg(str(quantized)))
    assert isinstance(r.module, QuantizedModel) and r.module.inference
    stage = GenerateStage(prompt=PROMPT, max_new_tokens=12)
    cached, text = generate_text(r.module, r.loaded, stage)
    uncached, _ = generate_text(r.module, r.loaded, stage, use_cache=False)
    assert got["new_ids"] == cached.new_ids == uncached.new_ids
    assert got["text"] == text and len(cached.new_ids) >= 1


def test_pruned_folder_generates_with_the_cache_as_without(lm, tmp_path):
    """Heads and MLP units cut (grouped-query attention kept consistent): the cache still agrees."""
    from slimformer.models.loading import parse_model_arg
    from slimformer.stages.artifact import load
    from slimformer.stages.generate import GenerateStage, generate_text

    out = tmp_path / "p"
    res = CliRunner().invoke(app, ["-q", "prune", str(lm), "--out", str(out), "--method",
                                   "magnitude", "--ratio", "0.3", "--finetune-steps", "0",
                                   "--limit", "16"])
    assert res.exit_code == 0, res.output
    got = _generate(out, "--prompt", PROMPT, "--max-new-tokens", 10)
    r = load(parse_model_arg(str(out)))
    assert r.applied == ["prune"]
    stage = GenerateStage(prompt=PROMPT, max_new_tokens=10)
    uncached, _ = generate_text(r.module, r.loaded, stage, use_cache=False)
    assert got["new_ids"] == uncached.new_ids
    ids = torch.tensor([uncached.prompt_ids])
    ref = r.module.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert got["new_ids"] == ref


def test_sampling_is_seeded_and_chat_template_applies(lm):
    a = _generate(lm, "--prompt", PROMPT, "--sample", "--temperature", 2, "--seed", 3)
    b = _generate(lm, "--prompt", PROMPT, "--sample", "--temperature", 2, "--seed", 3)
    assert a["new_ids"] == b["new_ids"]
    chat = _generate(lm, "--prompt", PROMPT, "--chat", "--max-new-tokens", 2)
    plain = _generate(lm, "--prompt", PROMPT, "--max-new-tokens", 2)
    assert chat["prompt_tokens"] == plain["prompt_tokens"] + 1  # the template's "<s>"


def test_generate_stage_in_a_recipe_is_reported(lm, tmp_path):
    from slimformer.pipeline import run
    from slimformer.recipe import parse_recipe

    recipe = parse_recipe({"model": {"source": "hf_dir", "path": str(lm)},
                           "data": {"eval_limit": 8},
                           "stages": [{"type": "generate", "prompt": PROMPT,
                                       "max_new_tokens": 6}]})
    res = run(recipe, out_dir=tmp_path / "run")
    m = res.report.stages[0].metrics
    assert m["new_tokens"] == len(_generate(lm, "--prompt", PROMPT, "--max-new-tokens", 6)
                                  ["new_ids"])
    assert m["decode_tokens_per_s"] > 0 and isinstance(m["text"], str)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["stages"][0]["metrics"]["text"] == m["text"]


def test_help_and_recipe_schema():
    res = CliRunner().invoke(app, ["generate", "--help"])
    assert res.exit_code == 0 and "--max-new-tokens" in res.output and "--chat" in res.output
    from slimformer.errors import ConfigError
    from slimformer.recipe import parse_recipe

    with pytest.raises(ConfigError, match="max_new_tokens"):
        parse_recipe(yaml.safe_load("stages: [{type: generate, prompt: hi, max_new_tokens: 0}]"))


def test_onnxruntime_runtime_float_and_weight_only_match_torch(lm, tmp_path):
    """--runtime onnxruntime (and openvino): the float folder's and a weight-only INT4
    folder's greedy tokens equal PyTorch's; an unknown runtime is refused naming the allowed
    ones."""
    torch_f = _generate(lm, "--prompt", PROMPT, "--max-new-tokens", 12)
    ort_f = _generate(lm, "--prompt", PROMPT, "--max-new-tokens", 12, "--runtime", "onnxruntime")
    assert ort_f["new_ids"] == torch_f["new_ids"] and ort_f["runtime"] == "onnxruntime"
    assert ort_f["decode_tokens_per_s"] > 0
    out = tmp_path / "w4"
    res = CliRunner().invoke(app, ["-q", "quantize", str(lm), "--out", str(out), "--weight-only",
                                   "--method", "minmax", "--weight-bits", "4", "--group-size", "32",
                                   "--calib-samples", "8", "--limit", "16"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    rec = next(s for s in rep["stages"] if s["type"] == "quantize")
    assert rec["config"]["embedding_bits"] == 8  # a causal LM at 4 bits: 8-bit tables by default
    assert any(n.startswith("embedding_bits 8: the default for a causal LM") for n in rec["notes"])
    assert rec["config"]["calib_window"] == 512  # weight-only causal LM: running-text windows
    assert any(n.startswith("calib_window 512: the default") for n in rec["notes"])
    assert any(n.startswith("calibration: 8 rows packed into") for n in rec["notes"])
    torch_q = _generate(out, "--prompt", PROMPT, "--max-new-tokens", 12)
    ort_q = _generate(out, "--prompt", PROMPT, "--max-new-tokens", 12, "--runtime", "onnxruntime")
    assert ort_q["new_ids"] == torch_q["new_ids"]
    if importlib.util.find_spec("openvino"):  # the same decoder file, read by OpenVINO (f32)
        ov_q = _generate(out, "--prompt", PROMPT, "--max-new-tokens", 12, "--runtime", "openvino")
        assert ov_q["new_ids"] == torch_q["new_ids"] and ov_q["runtime"] == "openvino"
    out0 = tmp_path / "w4-float-tables"
    res = CliRunner().invoke(app, ["-q", "quantize", str(lm), "--out", str(out0), "--weight-only",
                                   "--method", "minmax", "--weight-bits", "4", "--group-size", "32",
                                   "--embedding-bits", "0", "--calib-samples", "8", "--limit", "16"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out0 / "report.json").read_text())
    rec = next(s for s in rep["stages"] if s["type"] == "quantize")
    assert rec["config"]["embedding_bits"] is None and not any(
        n.startswith("embedding_bits") for n in rec["notes"])
    res = CliRunner().invoke(app, ["generate", str(lm), "--prompt", PROMPT, "--runtime", "tvm"])
    assert res.exit_code != 0 and "onnxruntime" in res.output


def test_tokenizer_comes_from_the_folder_a_model_was_built_into(lm):
    """A real zoo model (spec: its zoo name) is loaded from the HF folder the zoo built: its
    tokenizer is read there (`slimformer generate smollm2-135m` failed asking for --tokenizer)."""
    from types import SimpleNamespace

    from slimformer.errors import DataError
    from slimformer.stages.generate import tokenizer_of

    zoo = SimpleNamespace(spec=SimpleNamespace(source="zoo", name="x"), folder=lm)
    assert tokenizer_of(zoo)("a b")["input_ids"]
    with pytest.raises(DataError, match="no Hugging Face folder to read a tokenizer from"):
        tokenizer_of(SimpleNamespace(spec=SimpleNamespace(source="zoo", name="x"), folder=None))
