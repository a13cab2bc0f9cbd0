"""The super-network's masks compute exactly what the extracted (sliced) sub-network computes."""

import math

import numpy as np
import pytest
import torch

from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.models.structure import discover
from slimformer.nas.config import SpaceConfig
from slimformer.nas.measure import DroppedBlock, extract
from slimformer.nas.space import build_space, find_blocks
from slimformer.nas.supernet import SuperNet, task_loss


def _out(o):
    return (o.logits if hasattr(o, "logits") else o if isinstance(o, torch.Tensor) else
            o[0]).float()


def sqnr_db(ref, got):
    return 10 * math.log10(float((ref**2).sum()) / max(float(((ref - got) ** 2).sum()), 1e-30))


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit-fmnist"])
def test_masked_supernet_equals_extracted_subnet(name):
    lm = load_model(ZooSpec(name=name) if name.startswith("vit") else GENERALITY[name])
    x = lm.example_inputs(3, seed=1)
    smap = discover(lm.module, x)
    blocks = find_blocks(lm.module, x, smap)
    space = build_space(smap, blocks, SpaceConfig(heads=[0.5, 1.0], mlp=[0.25, 1.0]))
    net = SuperNet(lm.module, smap, space)
    assert net.probe(x) == (set(range(len(smap.attention))), set(range(len(smap.mlps))))
    net.rank([(x, torch.zeros(3, dtype=torch.long))], lambda o, y: _out(o).square().mean())
    rng = np.random.default_rng(0)
    for _ in range(3):
        sub = space.random(rng)
        with torch.no_grad(), net.applied(sub):
            masked = _out(lm.module(**x))
        model, sliced = extract(net, sub)
        assert sliced
        with torch.no_grad():
            got = _out(model(**x))
        assert sqnr_db(masked, got) > 80, sub  # same function, float rounding only
        kept = sum(p.numel() for p in model.parameters())
        if sub != space.largest():
            assert kept < sum(p.numel() for p in lm.module.parameters())
        assert sum(isinstance(m, DroppedBlock) for m in model.modules()) == sub.keep.count(False)
    with torch.no_grad():  # outside ``applied`` the model is the full one again
        assert torch.equal(_out(lm.module(**x)), _out(lm.module(**x)))
        assert net._masks == {} and net._skip == set()


def test_importance_ranking_prefers_units_that_matter():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    x = lm.example_inputs(64, seed=2)
    smap = discover(lm.module, x)
    space = build_space(smap, find_blocks(lm.module, x, smap), SpaceConfig())
    net = SuperNet(lm.module, smap, space)
    with torch.no_grad():
        labels = lm.module(**x).argmax(-1)
    net.rank([(x, labels)], task_loss)
    order = net.unit_order[0]
    assert sorted(order) == list(range(space.full_mlp[0]))
    # dropping the least important half hurts less than dropping the most important half
    def loss_keeping(units):
        keep = space.largest()
        net.unit_order[0] = units + [u for u in order if u not in units]
        sub = keep.__class__(keep.keep, keep.heads, (len(units), keep.mlp[1]), keep.wbits,
                             keep.abits)
        with torch.no_grad(), net.applied(sub):
            return float(task_loss(lm.module(**x), labels))

    half = len(order) // 2
    assert loss_keeping(order[:half]) < loss_keeping(order[half:])
