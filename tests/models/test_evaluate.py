"""Latency measurement: exact repeats, or a time budget that stops a slow model early."""

import time

import torch

from slimformer.models.evaluate import measure_latency


class _Slow(torch.nn.Module):
    """A linear layer that takes at least 50 ms a call."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        time.sleep(0.05)
        return self.fc(x)


def test_budget_stops_the_repeats_of_a_slow_model():
    x = {"x": torch.randn(2, 4)}
    t0 = time.perf_counter()
    res = measure_latency(_Slow(), x, repeats=20, warmup=3, budget_s=0.2)
    assert 3 <= res["repeats"] < 20 and time.perf_counter() - t0 < 0.2 + 0.05 * 8
    assert res["median_ms"] >= 50
    exact = measure_latency(_Slow(), x, repeats=4, warmup=1)  # no budget: every repeat runs
    assert exact["repeats"] == 4 and exact["median_ms"] >= 50
    fast = measure_latency(torch.nn.Linear(4, 4), {"input": torch.randn(2, 4)}, repeats=20,
                           budget_s=5.0)
    assert fast["repeats"] == 20  # a fast model is not cut short
