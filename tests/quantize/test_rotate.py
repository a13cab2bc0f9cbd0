"""Residual-stream rotation folded into the weights (``rotate``): exact in float, found by structure,
undone where its check fails, refused where asked for and impossible, saved and loaded.

Tiny random Llama (RMSNorm, tied or untied head) and GPT-2 (LayerNorm) from configs; float
outputs are compared by SQNR.
"""

import copy

import pytest
import torch
from torch import nn

from slimformer.data.datasets import TensorDictDataset
from slimformer.errors import UnsupportedModelError
from slimformer.models.outputs import metrics
from slimformer.models.structure import discover
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.quantizers import WeightQuantizer
from slimformer.quantize.rotate import orthogonal, plan, rotate_checked
from tests.tiny_lm import tiny_gpt2, tiny_llama

VOCAB = 64


def _rows(n=16, t=12, seed=0) -> TensorDictDataset:
    ids = torch.randint(2, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))
    return TensorDictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def _llama(tied: bool):
    m = tiny_llama(VOCAB, layers=2, pad_token_id=0, tie_word_embeddings=tied)
    with torch.no_grad():  # gains that are not all ones, so their fold is exercised
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=torch.Generator().manual_seed(1)))
    return m


def _db(a, b, x) -> float:
    with torch.no_grad():
        return metrics(a(input_ids=x).logits, b(input_ids=x).logits)["sqnr_db"]


@pytest.mark.parametrize("tied", [False, True])
def test_rotation_keeps_the_float_model_and_unties_a_tied_head(tied):
    """Gains folded (all ones after), tables and Linears rotated, outputs equal (> 90 dB)."""
    model, x = _llama(tied), _rows().inputs["input_ids"][:2]
    ref = copy.deepcopy(model)
    smap = discover(model, {"input_ids": x}, require_attention=False)
    status, notes = rotate_checked(model, smap, {"input_ids": x}, seed=0)
    assert status == "applied", notes
    assert _db(ref, model, _rows(seed=3).inputs["input_ids"]) > 90
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert emb is not head and not model.config.tie_word_embeddings
    assert not torch.allclose(emb, ref.model.embed_tokens.weight)
    assert any("untied" in n for n in notes) == tied


def test_orthogonal_is_orthogonal_and_seeded():
    r = orthogonal(48, seed=3)
    assert torch.allclose(r @ r.T, torch.eye(48, dtype=r.dtype), atol=1e-12)
    assert torch.equal(r, orthogonal(48, seed=3)) and not torch.equal(r, orthogonal(48, seed=4))


def test_rotation_spreads_large_weights_for_a_group_grid():
    """The premise: INT4 groups of a heavy-tailed weight (1% of its entries 20x the rest, each
    group's range set by them) round with a lower output error once rotated (``x W^T`` is
    unchanged: ``(x R) (W R)^T``); rotated, the entries are near-Gaussian."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) / 128**0.5
    w[torch.rand(64, 128, generator=g) < 0.01] *= 20
    x = torch.randn(512, 128, generator=g)
    r = orthogonal(128, seed=0).float()

    def err(m, xin):
        wq = WeightQuantizer(4)
        rows = m.reshape(-1, 32)
        wq.calibrate(rows)
        q = wq(rows).reshape(m.shape)
        y = x @ w.t()
        return metrics(y, xin @ q.t())["sqnr_db"]

    assert err(w @ r, x @ r) > err(w, x) + 2  # measured 21.96 vs 19.40 dB


def test_layernorm_model_is_left_alone_and_refused_when_asked():
    """GPT-2's LayerNorms subtract the mean: not rotation-invariant; auto notes it, on refuses."""
    model, rows = tiny_gpt2(VOCAB, layers=2, bos_token_id=1, eos_token_id=2), _rows()
    smap = discover(model, {"input_ids": rows.inputs["input_ids"][:2]}, require_attention=False)
    p, why = plan(model, smap)
    assert p is None and "LayerNorm" in why
    res = quantize(model, QuantConfig(weight_only=True, weight_bits=4, calib_batch_size=8), rows)
    assert res.model.config.rotate == "off"
    assert any("rotation not applicable" in n for n in res.notes)
    with pytest.raises(UnsupportedModelError, match="only RMSNorms"):
        quantize(model, QuantConfig(weight_only=True, weight_bits=4, calib_batch_size=8,
                                    rotate="on"), rows)


class _Shifted(nn.Module):
    """A pre-norm model whose stream also gets a learned vector: the plan cannot see it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 32)
        self.shift = nn.Parameter(torch.randn(32) * 3)
        self.n1, self.n2 = nn.RMSNorm(32), nn.RMSNorm(32)
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids) + self.shift
        x = x + self.fc2(torch.relu(self.fc1(self.n1(x))))
        return self.head(self.n2(x))


class _TableHead(_Shifted):
    """Logits from the embedding table itself (``F.linear``, no head module): not rotatable."""

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        x = x + self.fc2(torch.relu(self.fc1(self.n1(x))))
        return nn.functional.linear(self.n2(x), self.emb.weight)


def test_a_table_used_as_the_head_is_not_planned():
    model, x = _TableHead().eval(), _rows().inputs["input_ids"][:2]
    p, why = plan(model, discover(model, {"input_ids": x}, require_attention=False))
    assert p is None and "emb.weight is an embedding table" in why


def test_a_failed_check_restores_the_model():
    """The rotated outputs move (the shift is not rotated): undone, noted, weights as before."""
    model, rows = _Shifted().eval(), _rows()
    res = quantize(model, QuantConfig(weight_only=True, weight_bits=4, calib_batch_size=8), rows)
    assert res.model.config.rotate == "off"
    assert any("rotation undone" in n for n in res.notes), res.notes
    res.model.quant.set_mode("float")
    x = rows.inputs["input_ids"][:4]
    with torch.no_grad():
        assert torch.equal(res.model(input_ids=x), model(input_ids=x))


@pytest.mark.parametrize("tied", [False, True])
def test_rotated_int4_model_saves_and_loads_to_the_same_outputs(tied, tmp_path):
    """Weight-only INT4 with the rotation (auto): recorded as on, reloaded bit for bit in both
    forms with the head untied; with and without it above 15 dB of the float model."""
    from slimformer.models.loading import load_model
    from slimformer.models.spec import HfDirSpec
    from slimformer.quantize.inference import to_inference
    from slimformer.quantize.serialize import load_quantized, save_quantized

    _llama(tied).save_pretrained(tmp_path / "hf")
    spec = HfDirSpec(path=str(tmp_path / "hf"))
    model, rows = load_model(spec).module, _rows(32)
    x = _rows(4, 16, seed=5).inputs["input_ids"]
    cfg = QuantConfig(weight_only=True, weight_bits=4, group_size=32, calib_batch_size=8)
    res = quantize(model, cfg, rows)
    assert res.model.config.rotate == "on"
    assert any(n.startswith("residual stream rotated") for n in res.notes)
    plain = quantize(model, cfg.model_copy(update={"rotate": "off"}), rows)
    assert _db(model, res.model, x) > 15 and _db(model, plain.model, x) > 15
    for form, qm in (("sim", res.model), ("inf", to_inference(res.model))):
        save_quantized(qm, tmp_path / form, spec)
        back = load_quantized(tmp_path / form)
        assert back.config.rotate == "on"
        assert back.model.lm_head.weight is not back.model.model.embed_tokens.weight
        with torch.no_grad():
            assert torch.equal(back(input_ids=x).logits, qm(input_ids=x).logits)
