"""SIGKILL / SIGINT at any moment: the output path holds the previous output or nothing."""

import signal
import time
from pathlib import Path

import pytest
import yaml

from slimformer.store.outdir import MARKER

from .conftest import slimformer


def _wait_for(pred, proc, timeout=240.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _staging(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.") and
            p.name.endswith(".tmp")]


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "k", "model": {"source": "zoo", "name": "vit-digits-seq"},
        "data": {"eval_limit": 60},
        "stages": [{"type": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 1},
                   {"type": "export", "evaluate": False, "latency_batch_sizes": [1],
                    "latency_repeats": 200}],
        "output": {"dir": str(tmp_path / "out"), "overwrite": True}}))
    first = slimformer("run", recipe, cwd=tmp_path)
    assert first.wait(600) == 0, first.stdout.read()
    before = (tmp_path / "out" / "report.json").read_bytes()
    proc = slimformer("run", recipe, cwd=tmp_path)
    # kill it once the export has started writing inside the staging folder
    assert _wait_for(lambda: any((s / "export").is_dir() for s in _staging(tmp_path, "out")),
                     proc), proc.stdout.read() if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "out" / "report.json").read_bytes() == before  # previous output intact
    assert _staging(tmp_path, "out")  # what the kill left ...
    again = slimformer("run", recipe, cwd=tmp_path)
    assert again.wait(600) == 0, again.stdout.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]  # ... is gone
    assert (tmp_path / "out" / "export" / "model.onnx").is_file()


@pytest.mark.slow
def test_sigint_during_export_hls_leaves_nothing(tmp_path):
    out = tmp_path / "hls"
    proc = slimformer("export", "hls", "vit-digits-seq", "--out", out, cwd=tmp_path)
    # interrupt while hls4ml writes/compiles the project in its staging folder
    assert _wait_for(lambda: any(any(s.rglob("*.cpp")) for s in _staging(tmp_path, "hls")),
                     proc), proc.stdout.read() if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    assert "interrupted" in text and "Traceback" not in text
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_hls_moves_a_complete_project_in(tmp_path):
    out = tmp_path / "hls"
    proc = slimformer("export", "hls", "vit-digits-seq", "--out", out, "--no-csim", cwd=tmp_path)
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text
    assert (out / MARKER).is_file() and any(out.rglob("*.cpp"))
    assert str(out) in text and ".tmp" not in text  # messages name --out, not the staging
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hls"]
