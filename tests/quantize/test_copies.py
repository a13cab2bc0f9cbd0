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
from slimformer.quantize import api, outputjudge
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
    for mod, attr in ((outputjudge, "calibrate"), (api, "_calibrate")):
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
    assert where == ["outputjudge:minmax"] * 2 + ["api:repq"] + ["api:minmax"] * 2, seen
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


def test_minmax_keeps_a_quarter_of_the_sampled_rows_with_the_same_ranges(monkeypatch):
    """min/max fits ranges on the observed extremes: its quantizers sample 1,024 rows, not 4,096."""
    from slimformer.quantize import phases

    model = _Net().eval()
    x = torch.randn(32, 128, 32, generator=torch.Generator().manual_seed(2))
    calib = TensorDictDataset({"tokens": x}, torch.zeros(32, dtype=torch.long))
    rows: dict[str, list[int]] = {}
    real = phases.observe

    def spy(run):
        real(run)
        rows[run.config.method] = [len(m.samples()) for m in run.qmodel.quant.modules()
                                   if isinstance(m, ActQuantizer) and m.observed]

    monkeypatch.setattr(phases, "observe", spy)
    cfg = dict(softmax="none", calib_batch_size=8, smooth="off", outlier_channels=0)
    small = quantize(model, QuantConfig(method="minmax", **cfg), calib)
    # 4 batches of 8 x 128 positions: a quarter of sample_rows taken from each
    assert set(rows["minmax"]) == {4 * 256}
    quantize(model, QuantConfig(method="repq", repq_sites="all", **cfg), calib)
    assert set(rows["repq"]) == {3 * 1024}  # 8 rows held out to validate its choices
    assert set(rows["minmax"]) == {3 * 256}  # its min/max baseline on the same rows
    monkeypatch.setitem(phases.SAMPLE_ROWS, "minmax", 4096)
    big = quantize(model, QuantConfig(method="minmax", **cfg), calib)
    assert set(rows["minmax"]) == {4 * 1024}
    with torch.no_grad():  # the same ranges: the same model output, bit for bit
        assert torch.equal(small.model(tokens=x[:4]), big.model(tokens=x[:4]))
