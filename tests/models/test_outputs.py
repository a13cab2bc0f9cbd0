"""models.outputs: leaf names on nested structures and real Hugging Face ModelOutputs, the class
score rule, comparison metrics against known values, and evaluation of a model without logits."""

import math
from collections import namedtuple

import pytest
import torch
from torch import nn

from slimformer.data.datasets import TensorDictDataset, make_loader
from slimformer.errors import DataError
from slimformer.models import outputs as O
from slimformer.models.evaluate import compare_to_reference, evaluate, predict
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model


def test_leaf_names_of_nested_structures():
    t = [torch.randn(2, 3) for _ in range(6)]
    Pair = namedtuple("Pair", ["left", "right"])
    out = {"logits": t[0], "extra": (t[1], [t[2], None, {"deep": t[3]}]), "n": 3,
           "pair": Pair(t[4], t[5])}
    flat = O.leaves(out)
    assert list(flat) == ["logits", "extra.0", "extra.1.0", "extra.1.2.deep", "pair.left",
                          "pair.right"]
    assert all(flat[k] is v for k, v in zip(flat, t, strict=True))
    assert list(O.leaves(t[0])) == ["output"]
    assert list(O.leaves((t[0], (t[1], t[2])))) == ["0", "1.0", "1.1"]
    assert O.leaves(None) == {} and O.leaves(3.0) == {}


def test_class_score_rule():
    x = torch.randn(2, 5)
    assert O.class_scores(x) is x
    assert O.class_scores({"hidden": torch.randn(2, 4), "logits": x}) is x
    assert O.class_scores((x, torch.randn(2, 4))) is x
    assert O.class_scores({"last_hidden_state": x}) is None  # a mapping without logits
    assert O.class_scores(torch.arange(4)) is None  # not floating point
    labels = torch.tensor([1, 3])
    assert O.fits_labels(x, labels)
    assert not O.fits_labels(torch.randn(2, 7, 5), labels)  # (B, T, D) is not (B, C)
    assert O.fits_labels(torch.randn(2, 7, 5), torch.zeros(2, 7, dtype=torch.long))  # per token
    with pytest.raises(DataError, match=r"last_hidden_state \(2, 5\).*compare_to_reference"):
        O.require_class_scores({"last_hidden_state": x}, labels)


@pytest.mark.parametrize("name, want", [
    ("clip", ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds",
              "text_model_output.last_hidden_state", "text_model_output.pooler_output",
              "vision_model_output.last_hidden_state", "vision_model_output.pooler_output"]),
    ("t5", ["last_hidden_state", "encoder_last_hidden_state"]),  # the cache object is no output
    ("bert", ["logits"]),
])
def test_hugging_face_model_outputs(name, want):
    lm = load_model(GENERALITY[name])
    with torch.no_grad():
        out = lm.module(**lm.example_inputs(2))
    flat = O.leaves(out)
    assert list(flat) == want
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    scores = O.class_scores(out)
    assert (scores is flat["logits"]) if name == "bert" else scores is None


def test_metrics_against_hand_computed_values():
    ref = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    got = ref + torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, -0.1]])
    m = O.metrics(ref, got)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(24.0 / 0.02))
    a, b = ref.double().ravel(), got.double().ravel()
    assert m["cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())))
    assert m["max_abs"] == pytest.approx(0.1)
    assert m["argmax_agreement"] == 1.0
    flipped = O.metrics(ref, torch.tensor([[3.0, 2.0, 1.0], [3.0, 1.0, 0.0]]))
    assert flipped["argmax_agreement"] == 0.5
    assert "argmax_agreement" not in O.metrics(torch.randn(4), torch.randn(4))  # 1-D
    assert O.metrics(ref, ref)["sqnr_db"] == math.inf


def test_normalized_mse_weighs_outputs_equally():
    ref = {"big": torch.full((2, 100), 10.0), "small": torch.full((2, 1), 0.1)}
    got = {"big": ref["big"] * 1.1, "small": ref["small"] * 0.9}  # 1% relative energy each
    assert float(O.normalized_mse(got, ref)) == pytest.approx(0.01)
    with pytest.raises(DataError, match="output small has shape"):
        O.normalized_mse({"big": got["big"], "small": torch.zeros(3)}, ref)


class _Base(nn.Module):
    """A base encoder: hidden states and a pooled vector, no class scores."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        h = torch.tanh(self.lin(x))  # (B, T, 6)
        return {"last_hidden_state": h, "pooler_output": h.mean(1)}


def test_evaluation_without_class_scores_compares_all_outputs():
    torch.manual_seed(0)
    ref = _Base().eval()
    noisy = _Base().eval()
    noisy.load_state_dict(ref.state_dict())
    with torch.no_grad():
        noisy.lin.weight.add_(0.01 * torch.randn(6, 6))
    data = TensorDictDataset({"x": torch.randn(10, 4, 6)}, torch.zeros(10, dtype=torch.long))
    loader = make_loader(data, 4)
    with pytest.raises(DataError, match="no class scores for labels"):
        predict(noisy, loader)
    res = evaluate(noisy, loader, reference=ref)
    fid = res["fidelity"]
    assert list(fid["outputs"]) == ["last_hidden_state", "pooler_output"]
    # the same numbers as one comparison over all rows at once
    with torch.no_grad():
        want = O.metrics(ref(data.inputs["x"])["pooler_output"],
                         noisy(data.inputs["x"])["pooler_output"])
    assert fid["outputs"]["pooler_output"]["sqnr_db"] == pytest.approx(want["sqnr_db"])
    assert 10 < fid["sqnr_db"] < 80 and 0.99 < fid["cosine"] < 1.0
    assert compare_to_reference(ref, ref, loader)["sqnr_db"] == math.inf
    assert res["samples"] == 10
    with pytest.raises(DataError, match="no class scores"):
        evaluate(noisy, loader)


def test_seeded_forward_repeats_draws_and_keeps_the_callers_rng():
    class Sampler(nn.Module):
        def forward(self, x):
            return x[:, torch.randperm(x.shape[1])]

    x = torch.randn(2, 16)
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = O.seeded_forward(Sampler(), {"x": x})
    b = O.seeded_forward(Sampler(), {"x": x})
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(1), before)  # the caller's stream did not move
