"""Fixed-point types and the synthesis report parser (real report files, see SOURCES.md)."""

from pathlib import Path

import pytest
import torch

from slimformer.errors import HardwareError
from slimformer.hardware.fixed import FixedType, fixed_for_range, grid_type
from slimformer.hardware.synth import parse_baseline_json, parse_csynth_xml, synth_command

REPORTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "hls-reports"
needs_reports = pytest.mark.skipif(not REPORTS.is_dir(), reason=f"no report fixtures at {REPORTS}")


def test_grid_types_hold_quantizer_grids_exactly():
    for scale, zero, bits in [(0.125, 8, 4), (0.25, 0, 8), (2.0**-6, 100, 8), (1.0, 3, 3)]:
        t = grid_type(scale, zero, bits)
        grid = (torch.arange(2**bits, dtype=torch.float64) - zero) * scale
        assert torch.equal(t.quantize(grid), grid)  # every grid value, bit for bit
        # and the type is the narrowest: one bit less loses a grid value
        assert t.width <= bits + 1
    with pytest.raises(ValueError, match="power of two"):
        grid_type(0.3, 0, 8)


def test_fixed_rounding_and_saturation():
    t = FixedType(8, 3)  # step 1/32, range [-4, 4 - 1/32]
    x = torch.tensor([1.5 / 32, 2.5 / 32, 100.0, -100.0])
    assert t.quantize(x).tolist() == [2 / 32, 2 / 32, 4 - 1 / 32, -4.0]  # half to even
    assert FixedType(8, 3, rounding="AP_TRN").quantize(torch.tensor([1.9 / 32])).item() == 1 / 32
    assert t.hls == "ap_fixed<8,3,AP_RND_CONV,AP_SAT>"
    assert fixed_for_range(-1.0, 0.875, 3).width == 4


@needs_reports
def test_parse_vitis_csynth_xml():
    r = parse_csynth_xml(REPORTS / "6nrp-hls4ml-model_1" / "myproject_csynth.xml")
    assert (r.part, r.target_clock_ns, r.estimated_clock_ns) == ("xcu250-figd2104-2L-e", 5.0, 3.636)
    assert (r.latency_best, r.latency_worst, r.interval_min) == (15, 15, 1)
    assert (r.bram_18k, r.dsp, r.ff, r.lut, r.uram) == (8, 2557, 24233, 116694, 0)
    assert r.latency_ns == 75.0
    soft = parse_csynth_xml(next((REPORTS / "6nrp-hls4ml-model_1").glob("softmax_stable*.xml")))
    assert (soft.latency_worst, soft.dsp, soft.lut) == (5, 5, 742)


@needs_reports
def test_parse_vivado_csynth_xml():
    r = parse_csynth_xml(REPORTS / "hls4ml-test_report-Vivado" / "myproject_csynth.xml")
    assert (r.latency_worst, r.interval_min, r.estimated_clock_ns) == (10, 8, 4.049)
    assert (r.bram_18k, r.dsp, r.ff, r.lut) == (0, 73, 7969, 2532)


@needs_reports
def test_parse_hls4ml_baselines():
    b = REPORTS / "hls4ml-baselines"
    r = parse_baseline_json(
        b / "Vivado/2020.1/test_keras_api_test_activations_io_parallel-Vivado-sigmoid.json")
    assert (r.estimated_clock_ns, r.latency_worst, r.bram_18k, r.dsp, r.ff, r.lut) == \
        (3.969, 2, 32, 61, 1047, 9884)
    r = parse_baseline_json(b / "Vitis/2024.1/test_keras_api_test_dense_io_stream-Vitis.json")
    assert (r.latency_worst, r.interval_min, r.lut) == (4, 4, 279)


def test_bad_reports_are_typed_errors(tmp_path):
    (tmp_path / "x.xml").write_text("<profile><nothing/></profile>")
    with pytest.raises(HardwareError, match="not a C synthesis report"):
        parse_csynth_xml(tmp_path / "x.xml")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(HardwareError, match="CSynthesisReport"):
        parse_baseline_json(tmp_path / "x.json")


def test_synth_command_names_the_tool(tmp_path):
    assert "vivado_hls -f build_prj.tcl" in synth_command("Vivado", tmp_path)
    assert "vitis-run --tcl build_prj.tcl --mode hls" in synth_command("Vitis", tmp_path)
