"""Run-time activation ranges (``act_dynamic``): better than static on token outliers, saved and
reloaded identical, typed errors. Quality judged by the logits' SQNR vs float."""

import pytest
import torch
from pydantic import ValidationError

from slimformer.data.datasets import TensorDictDataset, get_dataset
from slimformer.models.loading import load_model
from slimformer.models.outputs import metrics
from slimformer.models.spec import ZooSpec
from slimformer.quantize.act import ActQuantizer
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference
from slimformer.quantize.quantizers import dynamic_params
from slimformer.quantize.serialize import load_quantized, save_quantized
from tests.tiny_lm import tiny_llama

VOCAB, T, MASSIVE = 64, 16, 1  # token id 1 carries the massive activations
DIGITS = ZooSpec(name="vit-digits-seq")


@torch.no_grad()
def _massive_llama():
    """A tiny Llama whose MLPs blow up on one token: down-projection inputs ~100x on its rows.

    The token's embedding alone holds channel 0, which the gate and up projections amplify (as
    the massive activations of trained decoders: a few tokens far past the rest).
    """
    m = tiny_llama(VOCAB, pad_token_id=0)
    emb = m.model.embed_tokens.weight
    emb[:, 0] = 0
    emb[MASSIVE, 0] = 8.0
    for layer in m.model.layers:
        layer.mlp.up_proj.weight[:, 0] *= 40
        layer.mlp.gate_proj.weight[:, 0] = layer.mlp.gate_proj.weight[:, 0].abs() * 40
    return m


def _rows(n: int, seed: int) -> TensorDictDataset:
    ids = torch.randint(2, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))
    ids[:, 3] = MASSIVE
    return TensorDictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_dynamic_params_per_token_and_tensor():
    x = torch.tensor([[[-1.0, 0.5, 2.0], [0.1, 0.2, 0.3]]])  # (1, 2, 3)
    s, z = dynamic_params(x, 8, per_token=True)
    assert s.shape == z.shape == (1, 2, 1)
    assert torch.allclose(s.reshape(-1), torch.tensor([3.0 / 255, 0.3 / 255]))  # 0 in the range
    assert z.reshape(-1).tolist() == [85.0, 0.0]
    s, z = dynamic_params(x, 8, per_token=False)
    assert s.shape == () and float(s) == pytest.approx(3.0 / 255)
    s, _ = dynamic_params(torch.zeros(2, 4), 8, per_token=True)
    assert s.tolist() == [[1.0], [1.0]]  # an all-zero row: scale 1 (as DynamicQuantizeLinear)


def test_per_token_ranges_hold_token_outliers():
    model, calib, test = _massive_llama(), _rows(16, 0), _rows(16, 1)
    ids = test.inputs["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    db, choices = {}, {}
    for dyn in ("off", "tensor", "token"):
        res = quantize(model, QuantConfig(method="minmax", act_dynamic=dyn, calib_samples=16,
                                          calib_batch_size=8, min_output_sqnr_db=None), calib)
        with torch.no_grad():
            db[dyn] = metrics(ref, res.model(input_ids=ids).logits)["sqnr_db"]
        choices[dyn] = [c.site for c in res.site_choices]
        acts = res.model.quant.acts.values()
        assert all(a.dynamic == (None if dyn == "off" else dyn) for a in acts)
        for a in res.model.quant.attention.values():  # the attention inputs stay static
            assert a.q_in.dynamic is None
    # measured: static 5.3 dB, per tensor 5.6 dB, per token 31.6 dB (smooth auto, judged)
    assert db["token"] > db["off"] + 15
    assert db["tensor"] > db["off"] - 1
    assert all("smooth" in c for c in choices.values())  # smooth auto's judge ran with each


@pytest.mark.parametrize("dyn", ["tensor", "token"])
def test_artifact_round_trip_identical(tmp_path, dyn):
    lm = load_model(DIGITS)
    res = quantize(lm.module, QuantConfig(act_dynamic=dyn, weight_bits=4, act_bits=6),
                   get_dataset("digits-seq", "calib", limit=32))
    x = {"x": get_dataset("digits-seq", "test").inputs["x"][:16]}
    for form, q in (("sim", res.model), ("inf", to_inference(res.model))):
        save_quantized(q, tmp_path / form, DIGITS)
        again = load_quantized(tmp_path / form)
        assert again.config.act_dynamic == dyn
        assert all(a.dynamic == dyn for a in again.quant.acts.values())
        with torch.no_grad():
            assert torch.equal(again(**x), q(**x))


def test_a_dynamic_quantizer_ignores_its_calibrated_range():
    act = ActQuantizer("in:w", 8)
    act.set_range(torch.tensor(-0.01), torch.tensor(0.01))  # far too narrow for x
    act.mode, act.dynamic = "quant", "token"
    x = torch.randn(4, 8) * torch.tensor([[1.0], [10.0], [100.0], [0.1]])
    err = (act(x) - x).abs().amax(-1)  # (4,): half a step of each row's own grid at most
    assert bool((err <= dynamic_params(x, 8, True)[0].reshape(-1) / 2 + 1e-6).all())


@pytest.mark.parametrize(("extra", "word"), [
    ({"weight_only": True}, "weight_only"),
    ({"method": "repq"}, "method repq"),
    ({"symmetric": True}, "symmetric"),
    ({"power_of_two_scales": True}, "power_of_two_scales"),
])
def test_combinations_that_make_no_sense_are_refused(extra, word):
    with pytest.raises(ValidationError, match=word):
        QuantConfig(act_dynamic="token", **extra)


def test_method_defaults_to_minmax_and_values_are_checked():
    assert QuantConfig(act_dynamic="tensor").method == "minmax"
    assert QuantConfig(act_dynamic="token", method="percentile").method == "percentile"
    assert QuantConfig().act_dynamic == "off"
    with pytest.raises(ValidationError, match="act_dynamic"):
        QuantConfig(act_dynamic="row")
