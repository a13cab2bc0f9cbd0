"""Reports: headline, narrow stage rows, plots, JSON/Markdown/HTML written all-or-nothing."""

import json
import subprocess
import sys

import pytest

from slimformer.report import render, summary
from slimformer.report.model import REPORT_SCHEMA_VERSION, Report, StageRecord, environment


def _report():
    st = StageRecord(index=0, type="evaluate", metrics={"accuracy": 0.87, "agreement": 1.0},
                     latency={"batch=1": {"median_ms": 1.5, "p90_ms": 2.0},
                              "batch=32": {"median_ms": 9.0, "p90_ms": 10.0}},
                     size={"params": 10, "bytes": 40}, notes=["a note"])
    return Report(name="t", stages=[st], metrics=st.metrics, environment=environment())


def test_writes_three_files_with_plot(tmp_path):
    out = render.write_report(_report(), tmp_path / "run")
    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"] == REPORT_SCHEMA_VERSION
    assert data["environment"]["packages"]["torch"]
    md = (out / "report.md").read_text()
    assert "| 0 | evaluate | 0.8700 | 40 B | PyTorch 1.50 ms | 0.0 |" in md and "a note" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64,iVBOR" in html  # an embedded PNG, no external files


def test_failed_write_leaves_previous_report_untouched(tmp_path, monkeypatch):
    out = tmp_path / "run"
    render.write_report(_report(), out)
    before = (out / "report.json").read_text()

    def boom(*_):
        raise RuntimeError("render failed")

    monkeypatch.setattr(render, "to_html", boom)
    with pytest.raises(RuntimeError):
        render.write_report(_report().model_copy(update={"name": "new"}), out)
    assert (out / "report.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp folders left


def _lat(ms):
    return {"median_ms": ms, "p90_ms": 1.1 * ms}


def _compressed(float_export=True, labels=True):
    """evaluate -> [export float] -> quantize -> evaluate -> export QDQ, with made-up numbers."""
    q = {"accuracy": 0.865} if labels else {"output_sqnr_db_min": 31.24, "output_cosine_min": 0.99}
    st = [StageRecord(index=0, type="evaluate",
                      metrics={"accuracy": 0.87} if labels else {"output_sqnr_db_min": float("inf")},
                      latency={"batch=1": _lat(1.6), "batch=32": _lat(9.0)},
                      size={"params": 10, "bytes": 4_000_000}),
          StageRecord(index=1, type="export", metrics={"quantized": False,
                                                       **({"accuracy": 0.87} if labels else {})},
                      latency={"onnxruntime batch=1": _lat(1.4)}, size={"bytes": 4_100_000}),
          StageRecord(index=2, type="quantize", metrics={"method": "repq", "bits": "W4A4"},
                      size={"bytes": 600_000}),
          StageRecord(index=3, type="evaluate", metrics=q, latency={"batch=1": _lat(11.3)},
                      size={"bytes": 600_000}),
          StageRecord(index=4, type="export", metrics={**q, "quantized": True, "opset": 17},
                      latency={"onnxruntime batch=1": _lat(1.0), "openvino batch=1": _lat(0.7)},
                      size={"bytes": 1_100_000},
                      notes=["front:", "| sub | acc |", "|---|---|", "| a | 0.9 |", "after"])]
    if not float_export:
        st = [st[0], *st[2:]]
        for i, s in enumerate(st):
            s.index = i
    return Report(name="vit-fmnist", stages=st)


def test_headline_size_accuracy_and_deployed_latency_vs_float():
    assert summary.headline(_compressed()) == \
        "vit-fmnist: 6.7x smaller, -0.5 pt, ONNX Runtime 1.4x faster than float (batch 1)"


def test_headline_with_the_float_model_timed_beside_it_in_the_export_stage():
    """The export stage times the float model interleaved with the quantized one (its keys
    ``onnxruntime float batch=N``): the headline compares them, largest batch first."""
    r = _compressed(float_export=False)
    r.stages[-1].latency = {"onnxruntime batch=1": _lat(0.8), "onnxruntime float batch=1":
                            _lat(0.5), "onnxruntime batch=32": _lat(10.0),
                            "onnxruntime float batch=32": _lat(16.0)}
    assert summary.headline(r) == ("vit-fmnist: 6.7x smaller, -0.5 pt, ONNX Runtime 1.6x faster "
                                   "than float (batch 32; 0.6x at batch 1)")


def test_headline_names_the_runtime_of_each_ratio_when_there_are_two():
    r = _compressed(float_export=False)
    r.stages[-1].latency = {"onnxruntime batch=1": _lat(0.8), "onnxruntime float batch=1":
                            _lat(0.5), "onnxruntime batch=32": _lat(10.0),
                            "onnxruntime float batch=32": _lat(16.0),
                            "openvino batch=1": _lat(0.5), "openvino float batch=1": _lat(1.0),
                            "openvino batch=32": _lat(4.0), "openvino float batch=32": _lat(5.0)}
    assert summary.headline(r) == (
        "vit-fmnist: 6.7x smaller, -0.5 pt, ONNX Runtime 1.6x faster than float, OpenVINO 1.2x "
        "faster than float (batch 32; at batch 1: ONNX Runtime 0.6x, OpenVINO 2.0x)")


def test_headline_without_a_float_export_or_labels():
    assert summary.headline(_compressed(float_export=False)) == (
        "vit-fmnist: 6.7x smaller, -0.5 pt, ONNX Runtime 1.00 ms, OpenVINO 0.70 ms at batch 1 "
        "(float not deployed to compare)")
    assert summary.headline(_compressed(labels=False)) == (
        "vit-fmnist: 6.7x smaller, output SQNR 31.2 dB vs float, ONNX Runtime 1.4x faster "
        "than float (batch 1)")
    only = Report(name="q", stages=[_report().stages[0]])
    assert summary.headline(only) == "q: no compression stage, 40 B, accuracy 0.8700, " \
        "PyTorch 1.50 ms at batch 1"


def test_headline_with_pytorch_latency_only_says_simulated():
    r = _compressed()
    r.stages = r.stages[:1] + r.stages[2:4]
    assert summary.headline(r).endswith("-0.5 pt, latency PyTorch-simulated only (no export stage)")


def test_headline_when_the_input_model_was_not_evaluated():
    r = _compressed()
    r.stages = r.stages[2:]
    r.model = {"bytes": 4_000_000}
    assert summary.headline(r) == ("vit-fmnist: 6.7x smaller, accuracy 0.8650 (input model not "
                                   "evaluated), ONNX Runtime 1.00 ms, OpenVINO 0.70 ms at batch 1 "
                                   "(float not deployed to compare)")
    r.stages = r.stages[:1]
    assert summary.headline(r) == "vit-fmnist: 6.7x smaller"


def test_narrow_rows_simulated_label_and_details(tmp_path):
    r = _compressed()
    head, rows = render.stage_table(r)
    assert head == ["#", "stage", "accuracy", "size", "latency (batch 1)", "s"]
    assert rows[3][1:5] == ["evaluate", "0.8650", "600.0 kB", "PyTorch 11.3 ms (simulated)"]
    assert rows[0][4] == "PyTorch 1.60 ms"  # the float model's PyTorch latency is real
    assert rows[4][1] == "export QDQ ONNX" and rows[4][4] == "ONNX Runtime 1.00 ms; OpenVINO 0.70 ms"
    md = render.to_markdown(r)
    assert md.splitlines()[2] == f"**{summary.headline(r)}**"
    assert md.count("### Stage ") == 5 and "\n| sub | acc |\n|---|---|\n| a | 0.9 |\n" in md
    html = render.to_html(r)
    assert html.count("<details>") == 5 + 2 and "(simulated)" in html
    assert "<th>sub</th><th>acc</th>" in html  # Markdown table notes become HTML tables
    assert html.index(summary.headline(r)) < html.index("<h2>Stages</h2>")
    assert max(len(row) for row in rows) == 6  # no column per metric


def test_plot_zooms_accuracy_and_colours_by_stage_type():
    fig = render.figure(_compressed())
    ax_size, ax_lat = fig.axes[:2]
    lo, hi = ax_size.get_ylim()
    assert 0.85 < lo < 0.865 and 0.87 < hi < 0.885  # zoomed, not 0-1
    colour = {tuple(c.get_edgecolor()[0][:3]) for c in ax_size.collections[:1] + ax_lat.collections[:1]}
    assert len(colour) == 1  # stage 0 (evaluate) has the same colour in both panels
    hollow = [c for c in ax_lat.collections if c.get_facecolor().size == 0 or
              c.get_facecolor()[0][3] == 0]
    assert len(hollow) == 1  # the simulated PyTorch latency of the quantized model
    assert ax_lat.get_xscale() == "log"  # 0.7 ms to 11.3 ms
    png = render.plot_png(_compressed(labels=False))
    assert png.startswith(b"\x89PNG")


def test_float_baseline_is_plotted_at_the_input_models_accuracy_and_the_headline_batch():
    """A float file timed beside the quantized one is the input model: its point sits at the
    input model's accuracy, not the quantized one's; table and plot use the headline's batch."""
    r = _compressed(float_export=False)
    r.stages[-1].latency = {"onnxruntime batch=1": _lat(0.8), "onnxruntime float batch=1":
                            _lat(0.5), "onnxruntime batch=32": _lat(10.0),
                            "onnxruntime float batch=32": _lat(16.0)}
    ax_lat = render.figure(r).axes[1]
    points = {tuple(c.get_offsets()[0]) for c in ax_lat.collections}
    assert (10.0, 0.865) in points and (16.0, 0.87) in points and (9.0, 0.87) in points
    assert "batch 32" in ax_lat.get_xlabel()
    head, rows = render.stage_table(r)
    assert head[4] == "latency (batch 32)" and "ONNX Runtime float 16.0 ms" in rows[-1][4]


def test_plot_does_not_set_a_process_wide_backend():
    code = ("import sys; from tests.report.test_render import _compressed; "
            "from slimformer.report.render import plot_png; plot_png(_compressed()); "
            "print('pyplot' in str(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_stage_images_embedded_from_the_run_folder(tmp_path):
    r = _compressed()
    png = render.plot_png(_report())
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "front.png").write_bytes(png)
    r.stages[2].images = {"front": "search/front.png", "gone": "search/none.png",
                          "outside": "../x.png"}
    (tmp_path.parent / "x.png").write_bytes(png)
    html = render.to_html(r, tmp_path)
    assert html.count("data:image/png;base64,") == 2  # the plots and the front
    assert "search/none.png not found" in html and "../x.png not found" in html
    assert "![front](search/front.png)" in render.to_markdown(r)


def test_write_report_embeds_images_written_beside_it(tmp_path):
    r = _compressed()
    r.stages[2].images = {"front": "search/front.png"}
    out = render.write_report(r, tmp_path / "run",
                              extra={"search/front.png": render.plot_png(_report())})
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "not found" not in html
