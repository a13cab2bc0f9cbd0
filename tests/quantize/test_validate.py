"""Choices judged at the model output: forwards that start at a site's block decide as whole ones."""

import functools

import pytest
import torch
from torch import nn

from slimformer.data.datasets import TensorDictDataset
from slimformer.quantize import validate
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.replay import Replay
from tests.quantize.blocks import PreNormMLP


class _Net(nn.Module):
    """Four pre-norm blocks and a head; LayerNorm gammas with 50x outlier channels (RepQ wins).

    ``reverse``: the blocks run last to first (each once): replay must not assume module order.
    """

    def __init__(self, d: int = 32, h: int = 64, reverse: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.blocks = nn.ModuleList(PreNormMLP(d, h) for _ in range(4))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 4)
        self.reverse = reverse
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() > 1
                                                              else 10))
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.add_(1.0)[[3, 11, 20]] *= 50

    def forward(self, tokens):
        x = tokens
        for b in (self.blocks[::-1] if self.reverse else self.blocks):
            x = b(x)
        return self.head(self.norm(x))


def _choices(model, calib, blocks: bool, monkeypatch) -> tuple[list, int]:
    """Every site choice of repq W6A6 (whole or replayed forwards) and block 0's norm calls."""
    if not blocks:  # as for a model without blocks: every forward whole
        monkeypatch.setattr(validate, "containers", lambda *a: [])
    calls = [0]
    handle = model.blocks[0].norm.register_forward_hook(lambda *a: calls.__setitem__(0,
                                                                                   calls[0] + 1))
    try:
        res = quantize(model, QuantConfig(method="repq", weight_bits=6, act_bits=6,
                                          softmax="none", smooth="off"), calib)
    finally:
        handle.remove()
        monkeypatch.undo()
    return [(c.site, c.what, c.kept, c.errors) for c in res.site_choices], calls[0]


@pytest.mark.parametrize("reverse", [False, True])
def test_replayed_forwards_make_the_same_choices_as_whole_ones(reverse, monkeypatch):
    model = _Net(reverse=reverse).eval()
    x = torch.randn(32, 8, 32, generator=torch.Generator().manual_seed(0))
    calib = TensorDictDataset({"tokens": x}, torch.zeros(32, dtype=torch.long))
    whole, whole_calls = _choices(model, calib, False, monkeypatch)
    replayed, replayed_calls = _choices(model, calib, True, monkeypatch)
    at_output = [c for c in whole if c[1] == "at the model output"]
    assert len(at_output) >= 4  # sites in several blocks were judged at the model output
    assert replayed == whole  # the same choices, with bit-identical held-out errors
    if reverse:  # blocks not in module order: every forward whole
        assert replayed_calls == whole_calls
    else:  # forwards for sites after block 0 did not run it
        assert replayed_calls < whole_calls


def test_replay_starts_at_the_first_block_holding_a_module_and_checks_the_call_order():
    model = _Net().eval()
    r = Replay(model, [[f"blocks.{i}" for i in range(4)]])
    assert r.start_of(["blocks.2.fc1", "blocks.1.fc2"]) == (0, 1)
    assert r.start_of(["blocks.2.fc1", "head"]) is None  # the head is in no block
    x = torch.randn(2, 8, 32)
    with torch.no_grad(), r.forward():
        ref = model(x)
    assert r.check()
    r.adopt()
    with torch.no_grad(), r.forward((0, 3)):
        got = model(x)
    assert torch.equal(got, ref)
    assert r.calls == [f"blocks.{i}" for i in range(4)]
    model.reverse = True
    with torch.no_grad(), r.forward():
        model(x)
    assert not r.check()  # blocks 3..0: replaying "the blocks before" would be wrong
    with torch.no_grad(), r.forward((0, 3)):  # replay off: every block runs
        assert torch.equal(model(x), model.head(model.norm(
            functools.reduce(lambda h, b: b(h), model.blocks[::-1], x))))
