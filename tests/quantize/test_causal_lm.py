"""Causal LMs quantized: calibration respects the causal and padding masks; generate() runs.

Tiny random Llama (grouped-query attention, RoPE) and GPT-2 (Conv1D weights) built from configs.
The quantizers have static ranges, so a one-token decode step on the KV cache quantizes exactly
as the whole sequence does: greedy tokens with and without the cache agree.
"""

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.models.generate import cache_argument, check_causal, generate_tokens
from slimformer.models.outputs import metrics
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference

VOCAB, T = 40, 12


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


BUILDERS = {"llama": _llama, "gpt2": _gpt2}


def _db(ref: torch.Tensor, got: torch.Tensor) -> float:
    """SQNR of ``got`` vs ``ref`` in dB."""
    return metrics(ref, got)["sqnr_db"]


def _rows(side: str, n: int = 16, seed: int = 0) -> TensorDictDataset:
    """``n`` rows of random tokens of lengths 3..T, padded on ``side`` (pad id 0, masked)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, T), generator=g)
    lens = torch.randint(3, T + 1, (n,), generator=g)
    mask = torch.zeros(n, T, dtype=torch.long)
    x = torch.zeros_like(ids)
    for i, n_tok in enumerate(lens.tolist()):
        cols = slice(0, n_tok) if side == "right" else slice(T - n_tok, T)
        mask[i, cols], x[i, cols] = 1, ids[i, :n_tok]
    return TensorDictDataset({"input_ids": x, "attention_mask": mask})


def _quantized(name: str, side: str = "right"):
    model = BUILDERS[name]()
    res = quantize(model, QuantConfig(method="minmax", calib_samples=16, calib_batch_size=8),
                   _rows(side))
    return model, res.model


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_calibration_respects_the_masks(name, side):
    """Each real token's quantized logits in a padded batch equal those of its row alone.

    The causal and padding masks keep pads out of every real token's past; the positions count
    real tokens only (as generate() does); the fully masked queries of left pads attend to
    nothing (no NaN, as in SDPA's safe softmax). The quantizers are static, so the rows agree
    to float rounding.
    """
    model, q = _quantized(name, side)
    ds = _rows(side, 8, seed=1)
    x, mask = ds.inputs["input_ids"], ds.inputs["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batched = q(input_ids=x, attention_mask=mask, position_ids=pos).logits
        for i in range(len(x)):
            real = mask[i].bool()
            alone = q(input_ids=x[i:i + 1, real], attention_mask=mask[i:i + 1, real]).logits[0]
            assert _db(alone, batched[i, real]) > 60.0, i
        assert torch.isfinite(batched).all()
        ref = model(input_ids=x, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert 20.0 < _db(ref[real], batched[real]) < 80.0  # quantized (not float), and close to float


@pytest.mark.parametrize("name", list(BUILDERS))
def test_quantized_generate_cached_equals_uncached(name):
    """HF's own generate() on the quantized model; our loop; with and without the KV cache."""
    model, q = _quantized(name)
    prompt = torch.tensor([[1, 5, 9, 13, 17]])
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    cached = q.generate(prompt, use_cache=True, **kw)
    uncached = q.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    arg = cache_argument(model)
    for m in (q, to_inference(q)):  # the simulated and the inference (integer) form
        ours = generate_tokens(m, prompt[0].tolist(), 10, cache_arg=arg)
        ours_nc = generate_tokens(m, prompt[0].tolist(), 10, use_cache=False, cache_arg=arg)
        assert ours.new_ids == ours_nc.new_ids == cached[0, prompt.shape[1]:].tolist()
        check_causal(m, prompt[0].tolist(), cache_arg=arg)
    # the quantizers act in generate(): its step scores differ from the float model's, slightly
    sq = q.generate(prompt, output_scores=True, return_dict_in_generate=True, **kw).scores[0]
    sf = model.generate(prompt, output_scores=True, return_dict_in_generate=True, **kw).scores[0]
    assert 20.0 < _db(sf, sq) < 80.0


def test_generate_on_a_wrapped_model_without_generate_is_typed():
    from torch import nn

    from slimformer.errors import UnsupportedModelError
    from slimformer.quantize.state import QuantizedModel, QuantState

    q = QuantizedModel(nn.Sequential(nn.Linear(4, 4)), QuantState(), QuantConfig())
    with pytest.raises(UnsupportedModelError, match="has no generate"):
        q.generate(torch.zeros(1, 4))


def test_repq_leaves_a_tied_head_untouched():
    """The final norm feeds the head, whose weight is the embedding table: RepQ must not rescale
    it (the lookups would read scaled rows) nor need a bias there; other norms still go
    per-channel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    rows = _rows("right", n=32)
    res = quantize(model, QuantConfig(method="repq", calib_samples=16, calib_batch_size=8), rows)
    q = res.model
    emb = q.model.get_input_embeddings().weight
    assert emb is q.model.get_output_embeddings().weight  # still tied
    assert torch.equal(emb, model.get_input_embeddings().weight)
    skipped = [n for n in res.notes if "per-channel ranges not tried" in n]
    assert len(skipped) == 1 and skipped[0].startswith("model.norm:")  # the head's norm only
    batch = rows.select(slice(0, 8)).inputs
    with torch.no_grad():
        ref, got = model(**batch).logits, q(**batch).logits
    assert _db(ref, got) > 20


def test_calibration_batches_shrink_to_bound_the_logits(monkeypatch):
    """Rows per calibration batch follow the bytes of one row's outputs (an LM's logits).

    With the bound at three rows' outputs, no forward sees more than three rows, the note says
    so, the artifact records the asked batch size, and min/max ranges (over all rows whatever
    the batching) give the same logits as batches of eight.
    """
    from slimformer.quantize import capture

    model, rows = _llama(), _rows("right")
    cfg = QuantConfig(method="minmax", calib_samples=16, calib_batch_size=8, smooth="off")
    whole = quantize(model, cfg, rows).model
    x = {k: v[:1] for k, v in rows.inputs.items()}
    per_row = sum(t.numel() * 4 for t in model(**x, use_cache=False).to_tuple()
                  if isinstance(t, torch.Tensor))
    monkeypatch.setattr(capture, "OUTPUT_BYTES", 3 * per_row)
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, a, k: seen.append(len(k["input_ids"])), with_kwargs=True)
    try:
        res = quantize(model, cfg, rows)
    finally:
        handle.remove()
    assert seen and max(seen) <= 3 and seen.count(3) >= 5, seen
    assert any("calibration batches of 3 rows, not calib_batch_size 8" in n for n in res.notes)
    assert res.model.config.calib_batch_size == 8
    ids = _rows("right", 4, seed=2).inputs
    assert _db(whole(**ids).logits, res.model(**ids).logits) > 100


def test_structure_probe_keeps_real_tokens_of_long_rows():
    """Discovery traces at most 64 positions: the first ones, or the last under left padding."""
    from slimformer.quantize.api import PROBE_TOKENS, _short

    ids = torch.arange(2 * 200).reshape(2, 200)
    right = torch.ones(2, 200, dtype=torch.long)
    right[1, 150:] = 0
    got = _short({"input_ids": ids, "attention_mask": right, "flag": torch.ones(3)})
    assert torch.equal(got["input_ids"], ids[:, :PROBE_TOKENS]) and got["flag"].shape == (3,)
    left = torch.ones(2, 200, dtype=torch.long)
    left[1, :180] = 0  # row 1 has only its last 20 positions real
    got = _short({"input_ids": ids, "attention_mask": left})
    assert torch.equal(got["attention_mask"], left[:, -PROBE_TOKENS:])
    assert _short({"input_ids": ids[:, :10], "attention_mask": right[:, :10]})["input_ids"].shape == (2, 10)
