"""quantize() holds few model copies and observation sets at once (its peak memory).

A spy on every calibration (the smoothing judgement's two, repq's, the min/max baseline's and the
fallback's) counts the live copies of the float model and the quantizer sets still holding
calibration observations when it starts: each copy is the model's weights again, each set
thousands of sampled rows per site.
"""

import gc

import torch
from torch import nn

from slimformer.data.datasets import TensorDictDataset
from slimformer.quantize import api, smoothjudge
from slimformer.quantize.act import ActQuantizer
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.state import QuantState
from tests.quantize.blocks import PreNormMLP


class _Net(nn.Module):
    """Two pre-norm MLP blocks and a head, ``tokens (B, T, 32) -> (B, T, 4)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(PreNormMLP(32, 64) for _ in range(2))
        self.head = nn.Linear(32, 4)

    def forward(self, tokens):
        x = tokens
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _live() -> tuple[int, int]:
    """(live ``_Net`` copies, quantizer sets holding observations)."""
    gc.collect()
    objs = gc.get_objects()
    nets = sum(type(o) is _Net for o in objs)
    observed = sum(type(o) is QuantState and any(
        isinstance(m, ActQuantizer) and m.observed for m in o.modules()) for o in objs)
    return nets, observed


def _spied(monkeypatch) -> list[tuple[str, int, int]]:
    seen = []
    for mod, attr in ((smoothjudge, "calibrate"), (api, "_calibrate")):
        real = getattr(mod, attr)

        def spy(model, config, *args, real=real, where=mod.__name__):
            seen.append((f"{where.rsplit('.', 1)[-1]}:{config.method}", *_live()))
            return real(model, config, *args)

        monkeypatch.setattr(mod, attr, spy)
    return seen


def test_repq_with_judged_smoothing_and_fallback_holds_one_float_copy(monkeypatch):
    model = _Net().eval()
    x = torch.randn(32, 8, 32, generator=torch.Generator().manual_seed(1))
    calib = TensorDictDataset({"tokens": x}, torch.zeros(32, dtype=torch.long))
    seen = _spied(monkeypatch)
    res = quantize(model, QuantConfig(method="repq", softmax="none", calib_batch_size=8), calib)
    where = [s[0] for s in seen]
    # every calibration ran: the judgement's two, repq, the min/max baseline, the fallback
    assert where == ["smoothjudge:minmax"] * 2 + ["api:repq"] + ["api:minmax"] * 2, seen
    judged = next(c for c in res.site_choices if c.site == "smooth")
    assert any("fell back to minmax" in n for n in res.notes)
    # the caller's model and the working copy; the min/max models wrap the one float copy
    # kept for them (before: a copy per judgement trial and per min/max model, up to 5)
    assert [s[1] for s in seen] == [2, 2, 3, 3, 3], seen
    # repq's observations stay for the min/max baseline (repq may be kept); none after it
    assert [s[2] for s in seen] == [0, 0, 0, 1, 0], seen
    assert judged.kept == "off"  # the judgement put the float weights back
    # the result: the min/max model on all the rows, bit for bit
    mm = quantize(model, QuantConfig(method="minmax", softmax="none", calib_batch_size=8,
                                     smooth="off"), calib)
    with torch.no_grad():
        assert torch.equal(res.model(tokens=x), mm.model(tokens=x))
