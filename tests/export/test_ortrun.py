"""The ONNX Runtime runner: timing an exported file or an open session, outputs by name."""

import pytest
import torch
from torch import nn

from slimformer.export.config import OnnxConfig
from slimformer.export.onnx import export_onnx
from slimformer.export.ortrun import ort_latency, run_all, session, time_session
from slimformer.models.evaluate import latency_stats


def test_latency_stats_median_and_p90_of_unsorted_times():
    res = latency_stats([5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 8.0, 7.0, 9.0])
    assert res == {"median_ms": 5.5, "p90_ms": 10.0, "repeats": 10}
    assert latency_stats([2.0]) == {"median_ms": 2.0, "p90_ms": 2.0, "repeats": 1}


def test_ort_latency_times_the_file_that_runs_like_pytorch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = {"input": torch.randn(3, 16)}
    export_onnx(model, tmp_path / "m.onnx", x, OnnxConfig(check=False, lint=False))
    out = next(iter(run_all(session(tmp_path / "m.onnx"), x).values()))
    ref = model(x["input"]).detach().numpy()
    sqnr = 10 * torch.log10(torch.tensor((ref ** 2).sum() / max(((out - ref) ** 2).sum(), 1e-30)))
    assert sqnr > 100  # float32 ONNX Runtime vs PyTorch: rounding-level differences only
    lat = ort_latency(tmp_path / "m.onnx", x, repeats=7, warmup=1, threads=1)
    assert lat["repeats"] == 7 and lat["threads"] == 1
    assert 0 < lat["median_ms"] <= lat["p90_ms"]
    again = time_session(session(tmp_path / "m.onnx", threads=1), x, repeats=3, warmup=0)
    assert set(again) == {"median_ms", "p90_ms", "repeats"} and again["repeats"] == 3


def test_unloadable_file_is_an_export_error(tmp_path):
    from slimformer.errors import ExportError

    (tmp_path / "bad.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ExportError, match="cannot load"):
        session(tmp_path / "bad.onnx")
