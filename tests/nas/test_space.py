"""Search space: residual blocks found from the data flow, user restrictions, bad input."""

import numpy as np
import pytest
from pydantic import ValidationError

from slimformer.errors import ConfigError
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.models.structure import discover
from slimformer.nas.config import SearchConfig, SpaceConfig
from slimformer.nas.space import build_space, find_blocks
from slimformer.recipe import parse_recipe


def _blocks(spec):
    lm = load_model(spec)
    x = lm.example_inputs(2)
    smap = discover(lm.module, x)
    return lm, smap, find_blocks(lm.module, x, smap)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "torch-encoder-postnorm", "t5"])
def test_blocks_are_found_on_many_families(name):
    lm, smap, blocks = _blocks(GENERALITY[name])
    # one residual block per self-attention layer (T5's decoder: its sub-layers), in order
    assert len(blocks) >= 2
    assert all(len(b.attention) == 1 for b in blocks)
    sites = [b.attention[0] for b in blocks]
    assert sites == sorted(sites)
    for b in blocks:  # every block owns its MLP and Linears
        assert b.linears and all(w.startswith(b.path + ".") for w in b.linears)


def test_space_choices_follow_the_restrictions():
    _, smap, blocks = _blocks(ZooSpec(name="vit-fmnist"))
    cfg = SpaceConfig(heads=[0.5, 1.0], mlp=[0.5, 1.0], min_blocks=4, fixed_blocks=[0],
                      weight_bits=[4, "float"], act_bits=[8])
    space = build_space(smap, blocks, cfg)
    assert len(space.blocks) == 6 and space.skippable == (1, 2, 3, 4, 5)
    assert space.head_choices == ((2, 4),) * 6 and space.mlp_choices == ((192, 384),) * 6
    rng = np.random.default_rng(0)
    for _ in range(50):
        sub = space.random(rng)
        assert sum(sub.keep) >= 4 and sub.keep[0]
        assert set(sub.wbits) <= {4, "float"}
        assert space.from_params(space.to_params(sub)) == sub
    assert space.encode(space.largest()).max() == 1.0
    assert space.encode(space.smallest()).sum() < space.encode(space.largest()).sum()


def test_empty_space_is_a_config_error():
    _, smap, blocks = _blocks(ZooSpec(name="vit-digits-seq"))
    one = SpaceConfig(heads=[1.0], mlp=[1.0], skip_blocks=False, weight_bits=[8], act_bits=[8])
    with pytest.raises(ConfigError, match="single sub-network"):
        build_space(smap, blocks, one)
    with pytest.raises(ConfigError, match="space.mlp: empty list"):
        build_space(smap, blocks, SpaceConfig(mlp=[]))
    with pytest.raises(ConfigError, match="min_blocks: 5 but the model has only 2"):
        build_space(smap, blocks, SpaceConfig(min_blocks=5))


def test_unknown_objective_is_rejected_with_the_allowed_names():
    with pytest.raises(ValidationError, match="unknown objective.*'speed'.*allowed: accuracy, "
                                              "latency, size, macs"):
        SearchConfig(objectives=["accuracy", "speed"])
    with pytest.raises(ValidationError, match="must include 'accuracy'"):
        SearchConfig(objectives=["size", "latency"])
    with pytest.raises(ConfigError, match=r"stages\[0\].objectives.*'flops'"):
        parse_recipe({"stages": [{"type": "search", "objectives": ["accuracy", "flops"]}]})
    with pytest.raises(ConfigError, match=r"stages\[1\]: the model is quantized already"):
        parse_recipe({"stages": [{"type": "search"}, {"type": "quantize"}]})
