"""Reports: JSON/Markdown/HTML with a plot, written all-or-nothing."""

import json

import pytest

from slimformer.report import render
from slimformer.report.io import atomic_path
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
    assert "| 0 | evaluate | 0.8700 | 1.0000 | 1.5000 | 9.0000 |" in md and "a note" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64,iVBOR" in html  # an embedded PNG, no external files


def test_failed_write_leaves_previous_report_untouched(tmp_path, monkeypatch):
    out = tmp_path / "run"
    render.write_report(_report(), out)
    before = (out / "report.json").read_text()

    def boom(_):
        raise RuntimeError("render failed")

    monkeypatch.setattr(render, "to_html", boom)
    with pytest.raises(RuntimeError):
        render.write_report(_report().model_copy(update={"name": "new"}), out)
    assert (out / "report.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp folders left


def test_atomic_path_cleans_up(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError
    assert list(tmp_path.iterdir()) == []
