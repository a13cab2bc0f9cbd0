"""PruneResult.headline and reduction: say what was cut; count only what was cut."""

import pytest

from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.models.structure import discover
from slimformer.prune.api import prune
from slimformer.prune.config import PruneConfig

MAGNITUDE = dict(method="magnitude", finetune_steps=0)


def _prune(name, **cfg):
    lm = load_model(GENERALITY[name])
    x = lm.example_inputs(2)
    s = discover(lm.module, x)
    res = prune(lm.module, PruneConfig(**MAGNITUDE, **cfg), inputs=x, structure=s)
    return _mlp_params(lm.module, s), res


def _mlp_params(model, s):
    """Parameters one MLP unit owns, summed over every unit: fc1 rows (+ bias), fc2 columns."""
    params = dict(model.named_parameters())
    total = 0
    for m in s.mlps:
        for w in m.fc1:
            bias = params.get(w.removesuffix("weight") + "bias")
            total += params[w].numel() + (bias.numel() if bias is not None else 0)
        total += params[m.fc2].numel()
    return total


def test_heads_that_cannot_be_cut_are_named_and_not_counted():
    # fused q/k/v whose forward splits heads by the input's width: heads cannot be sliced
    mlp_params, res = _prune("braid-net", ratio=0.5)
    assert set(res.skipped["heads"]) == {0, 1} and res.kept["heads"] == {}
    assert res.cut == {"mlp": (2, 2)}
    # the prunable cost is the MLPs' alone, and what left the model is exactly what it lost
    assert res.prunable_before == mlp_params
    assert res.params_before - res.params_after == res.prunable_before - res.prunable_after
    assert res.reduction == pytest.approx(2.0, rel=0.02)
    h = res.headline
    assert h.startswith("2.00x fewer params in the structures cut (")
    assert f"({res.params_before / res.params_after:.2f}x in the whole model)" in h
    assert "MLP units cut at 2 of 2 sites" in h
    assert "heads not cut at 2 of 2 sites (the sliced forward failed: RuntimeError: shape" in h
    assert res.summary()["headline"] == h


def test_a_kind_left_whole_is_not_in_the_ratio():
    # at ratio 0.1 magnitude pruning keeps all 4 heads per site and cuts MLP units only
    mlp_params, res = _prune("torch-encoder", ratio=0.1)
    assert all(k == n for k, n in res.kept["heads"].values())
    assert res.cut == {"heads": (0, 2), "mlp": (2, 2)}
    assert res.prunable_before == mlp_params
    assert res.params_before - res.params_after == res.prunable_before - res.prunable_after
    assert "MLP units cut at 2 of 2 sites; heads left whole at 2 of 2 sites (none chosen)" in \
        res.headline


def test_everything_cut_headline():
    _, res = _prune("llama", ratio=0.5)
    assert res.skipped == {} and res.cut == {"heads": (2, 2), "mlp": (2, 2)}
    assert res.headline.endswith(": heads cut at 2 of 2 sites; MLP units cut at 2 of 2 sites")
