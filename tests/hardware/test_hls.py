"""build_hls on vit-digits-seq: compiled once (g++), C-simulated on all 497 test rows."""

import pytest

from slimformer.data.datasets import get_dataset
from slimformer.hardware.api import build_hls
from slimformer.hardware.config import HlsConfig
from slimformer.models.zoo import load_zoo_model
from slimformer.quantize import QuantConfig, quantize, to_inference

pytestmark = pytest.mark.slow  # one g++ compile of the project: ~40-60 s on 2 cores


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    model = load_zoo_model("vit-digits-seq").eval()
    calib, test = get_dataset("digits-seq", "calib"), get_dataset("digits-seq", "test")
    cfg = QuantConfig(method="minmax", weight_bits=8, act_bits=8, softmax="none",
                      power_of_two_scales=True)
    q = to_inference(quantize(model, cfg, calib).model)
    ticks = []
    res = build_hls(q, HlsConfig(), tmp_path_factory.mktemp("hls") / "prj", calib, test,
                    progress=lambda *t: ticks.append(t))
    res.ticks = ticks
    return res


def test_progress_on_project_compile_and_every_csim_chunk(result):
    steps = {step for step, _, _ in result.ticks}
    assert {"hls: project", "hls: compile (g++)", "hls: C-simulation"} <= steps
    assert ("hls: compile (g++)", 1, 1) in result.ticks
    csim = [done for step, done, total in result.ticks if step == "hls: C-simulation"]
    assert csim == [0, 64, 128, 192, 256, 320, 384, 448, 497]  # 497 rows, 64 a call


def test_csim_agrees_with_our_fixed_point_reference(result):
    c = result.csim
    assert c.rows == 497
    assert c.agreement_reference >= 0.99
    # outputs in units of the output type's LSB
    lsb = result.precisions.result(result.graph.outputs[0]).step
    assert c.max_error <= 2 * lsb


def test_csim_accuracy_within_one_point_of_float(result):
    c = result.csim
    assert c.accuracy_float > 0.95
    assert abs(c.accuracy_csim - c.accuracy_float) <= 0.01


def test_estimate_under_two_microseconds_at_200_mhz(result):
    e = result.estimate
    assert e.clock_mhz == 200 and "estimate" in e.label
    assert e.latency_us < 2.0
    assert e.dsp > 0 and e.lut > 0


def test_project_is_written_with_the_synthesis_command(result):
    d = result.project_dir
    assert (d / "firmware" / "myproject.cpp").is_file() and (d / "build_prj.tcl").is_file()
    params = (d / "firmware" / "parameters.h").read_text()
    assert "n_outer = 16" in params  # pitfall (c) fixed in the written project
    if result.synth_tool is None:
        assert any("synthesis not run" in n for n in result.notes)
        assert str(d) in result.synth_command
