"""prune(): the search, slicing and fine-tuning on small models; bad input; resume; save/load."""

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.errors import ConfigError, DataError, ModelLoadError, UnsupportedModelError
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.prune import PruneConfig, load_pruned, prune, save_pruned
from slimformer.prune.units import UnitGroup
from slimformer.prune.upop import choose, choose_exact, kept_cost, schedule

FAST = dict(search_steps=4, interval=2, finetune_steps=2, batch_size=8)


def _encoder_task(n=64, seed=0):
    """torch-encoder generality model with a learnable synthetic task (label = argmax of mean)."""
    lm = load_model(GENERALITY["torch-encoder"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, 64, generator=g)
    y = x.mean(1)[:, :10].argmax(-1)
    return lm, TensorDictDataset({"src": x}, y)


def test_schedule_and_choose():
    assert schedule(0, 10, 0.5) == 0.0 and schedule(10, 10, 0.5) == pytest.approx(0.5)
    assert schedule(5, 10, 0.5) == pytest.approx(0.5 * 0.5**0.5)
    groups = [UnitGroup("heads", 0, 4, 1, 16, (), (), 10.0), UnitGroup("mlp", 0, 8, 1, 1, (), (), 1.0)]
    score = [torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.arange(8.0)]
    pruned = choose(score, groups, 0.5)  # 24 of 48: mlp 7..4, head 0, mlp 3, head 1 = 25
    assert pruned[0].tolist() == [True, True, False, False]
    assert pruned[1].tolist() == [False] * 3 + [True] * 5
    everything = choose(score, groups, 1.0)
    assert (~everything[0]).sum() == 1 and (~everything[1]).sum() == 1  # one unit per site stays


def test_kept_cost_heads_and_dims_multiply():
    groups = [UnitGroup("heads", 0, 4, 1, 8, (), (), 8.0), UnitGroup("dims", 0, 8, 1, 1, (), (), 4.0),
              UnitGroup("mlp", 0, 8, 1, 1, (), (), 1.0)]
    keep = [torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.arange(8) < 4, torch.arange(8) < 8]
    assert kept_cost(groups, keep) == pytest.approx(32 * 0.5 * 0.5 + 8)  # attention counted once
    score = [torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.arange(8.0), torch.zeros(8)]
    pruned = choose_exact(score, groups, 0.5)
    removed = kept_cost(groups, [torch.ones(g.n, dtype=torch.bool) for g in groups]) - kept_cost(
        groups, [~p for p in pruned])
    assert removed >= 0.5 * 40 and removed < 0.5 * 40 + 8


@pytest.mark.parametrize("method", ["upop", "magnitude"])
def test_prune_halves_prunable_params(method):
    lm, data = _encoder_task()
    before = {k: v.clone() for k, v in lm.module.state_dict().items()}
    res = prune(lm.module, PruneConfig(ratio=0.5, method=method, **FAST), data, data)
    assert all(torch.equal(before[k], v) for k, v in lm.module.state_dict().items())
    assert 1.8 < res.reduction < 2.2
    assert res.params_after < res.params_before and res.macs_after < res.macs_before
    assert res.accuracy_before is not None and res.accuracy_after is not None
    out = res.model(src=data.inputs["src"][:3])
    assert out.shape == (3, 10)
    heads = [k for k, _ in res.kept["heads"].values()]
    assert all(h >= 1 for h in heads) and res.kept["mlp"]


def test_score_momentum_keeps_past_intervals(monkeypatch):
    import slimformer.prune.upop as upop

    real, seen = upop._scores, []

    def record(grads, groups, taylor):
        seen.append([g.clone() for g in grads])
        return real(grads, groups, taylor)

    monkeypatch.setattr(upop, "_scores", record)
    lm, data = _encoder_task()
    prune(lm.module, PruneConfig(ratio=0.5, **FAST), data, data)
    plain, seen[:] = list(seen), []
    cfg = PruneConfig(ratio=0.5, score_momentum=0.8, **FAST)
    res = prune(lm.module, cfg, data, data)
    assert len(seen) == len(plain) == 2  # same data and first ranking: same second interval
    for m, g0, g1 in zip(seen[1], plain[0], plain[1], strict=True):
        torch.testing.assert_close(m, 0.8 * g0 + g1)
    assert 1.8 < res.reduction < 2.2
    with pytest.raises(ConfigError, match=r"score_momentum: Input should be less than 1"):
        prune(lm.module, {"score_momentum": 1.0}, data)


def test_taylor_score_cuts_dead_units_first():
    """Hidden units whose fc2 column is zero cost no loss: the Taylor score cuts exactly them."""
    from slimformer.models.structure import discover

    lm, data = _encoder_task()
    model = lm.module
    smap = discover(model, {"src": data.inputs["src"][:2]})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for m in smap.mlps:
            params[m.fc2][:, 1::2] = 0  # odd hidden units are dead
    cfg = PruneConfig(ratio=0.5, structures=["mlp"], score="taylor", search_lr=1e-9,
                      search_steps=4, interval=2, finetune_steps=0, batch_size=8)
    res = prune(model, cfg, data, data)
    assert res.spec.mlp and all(kept == tuple(range(0, m.hidden, 2))
                                for kept, m in zip(res.spec.mlp.values(), smap.mlps, strict=True))
    assert res.accuracy_after == res.accuracy_before  # only dead units went
    with pytest.raises(ConfigError, match=r"score: Input should be 'gradient' or 'taylor'"):
        prune(model, {"score": "fisher"}, data)


def test_macs_target_and_heads_only_bert():
    lm = load_model(GENERALITY["bert"])
    x = lm.example_inputs(16)
    data = TensorDictDataset(x, torch.arange(16) % 2)
    res = prune(lm.module, PruneConfig(ratio=0.5, target="macs", structures=["heads"], **FAST),
                data)
    assert set(res.kept) == {"heads", "mlp", "dims"} and not res.kept["mlp"]
    assert sum(k for k, _ in res.kept["heads"].values()) < 8
    assert res.model(**{k: v[:2] for k, v in x.items()}).logits.shape == (2, 2)


@pytest.mark.parametrize("method", ["upop", "magnitude"])
def test_head_dims_with_heads_and_mlp_bert(method, tmp_path):
    lm = load_model(GENERALITY["bert"])
    x = lm.example_inputs(16)
    data = TensorDictDataset(x, torch.arange(16) % 2)
    cfg = PruneConfig(ratio=0.5, method=method, structures=["heads", "dims", "mlp"], **FAST)
    res = prune(lm.module, cfg, data, data)
    assert res.kept["dims"] and all(qk == v < d for qk, v, d in res.kept["dims"].values())
    assert 1.8 < res.reduction < 2.3  # params actually removed / prunable params
    heads = res.model.bert.encoder.layer[0].attention.self
    qk = res.kept["dims"][0][0]
    assert heads.attention_head_size == qk
    assert heads.query.out_features == res.kept["heads"][0][0] * qk
    small = {k: v[:2] for k, v in x.items()}
    out = save_pruned(res.model, tmp_path / "p", lm.spec, res.spec, config=cfg)
    back = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(back.module(**small).logits, res.model(**small).logits)


def test_bad_input():
    lm, data = _encoder_task()
    for bad in ({"ratio": 1.0}, {"ratio": 0.0}, {"ratio": -0.5}):
        with pytest.raises(ConfigError, match=r"ratio: Input should be (less|greater) than"):
            prune(lm.module, bad, data)
    with pytest.raises(ConfigError, match=r"unknown structure\(s\) \['embeddings'\]"):
        prune(lm.module, {"structures": ["embeddings"]}, data)
    with pytest.raises(DataError, match="train_data is required"):
        prune(lm.module, PruneConfig(), None, data)
    with pytest.raises(DataError, match="no example inputs"):
        prune(lm.module, PruneConfig(method="magnitude", finetune_steps=0))


def test_model_without_heads_or_mlp():
    from torch import nn

    data = TensorDictDataset({"input": torch.randn(8, 8)}, torch.zeros(8, dtype=torch.long))
    head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # not a residual MLP
    with pytest.raises(ConfigError, match=r"structures: the model has no mlp \(found 0"):
        prune(head, PruneConfig(method="magnitude", finetune_steps=0, structures=["mlp"]), data)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(UnsupportedModelError, match="no attention found"):
        prune(mlp, PruneConfig(method="magnitude", finetune_steps=0), data)
    res = prune(mlp, PruneConfig(method="magnitude", finetune_steps=0, structures=["mlp"]), data)
    assert res.model[0].weight.shape == (8, 8)
    lm = load_model(GENERALITY["t5"])  # heads exist but cannot be cut (shared position bias)
    with pytest.raises(UnsupportedModelError, match="nothing to prune"):
        prune(lm.module, PruneConfig(method="magnitude", finetune_steps=0, structures=["heads"]),
              inputs=lm.example_inputs(2))


def test_resume_from_checkpoint(tmp_path, monkeypatch):
    lm, data = _encoder_task()
    cfg = PruneConfig(ratio=0.5, search_steps=4, interval=2, finetune_steps=6, batch_size=8,
                      checkpoint_every=2)
    import slimformer.prune.api as api

    real = api.finetune
    calls = []

    def crash(*a, **k):  # interrupt fine-tuning after its first checkpoint
        def ckpt(step, state):
            k_ckpt(step, state)
            raise KeyboardInterrupt

        k_ckpt = a[6]
        calls.append(1)
        return real(*a[:6], ckpt, *a[7:], **k)

    monkeypatch.setattr(api, "finetune", crash)
    with pytest.raises(KeyboardInterrupt):
        prune(lm.module, cfg, data, checkpoint=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune.pt", "search.pt"]
    monkeypatch.setattr(api, "finetune", real)
    res = prune(lm.module, cfg, data, checkpoint=tmp_path)
    assert "search resumed from checkpoint" in res.notes
    assert "fine-tuning resumed at step 2" in res.notes
    with pytest.raises(ModelLoadError, match="another prune config"):  # never resumed silently
        prune(lm.module, cfg.model_copy(update={"seed": 1}), data, checkpoint=tmp_path)


def test_save_load_roundtrip(tmp_path):
    lm, data = _encoder_task()
    cfg = PruneConfig(method="magnitude", finetune_steps=2, batch_size=8)
    res = prune(lm.module, cfg, data)
    save_pruned(res.model, tmp_path / "p", lm.spec, res.spec, config=cfg)
    loaded = load_pruned(tmp_path / "p", trust_code=True)  # torch-encoder is a factory
    x = data.inputs["src"][:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(src=x), res.model(src=x))
    with pytest.raises(ModelLoadError, match="not a saved pruned model"):
        load_pruned(tmp_path)
