"""report.html rendered in headless Chromium: plots and the search front are present and visible.

Skipped only where ``chromium`` is missing and not in CI (``CI=true`` fails instead).
"""

import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from slimformer.report import render
from tests.report.test_render import _compressed, _report

# Appended to a copy of the report: after load, write what each <img> is into the DOM.
_PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => {
    const r = i.getBoundingClientRect(), st = getComputedStyle(i);
    return {alt: i.alt, complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
            box: [r.width, r.height], visible: st.visibility !== "hidden" && st.display !== "none"
              && i.closest("details:not([open])") === null, src: i.src.slice(0, 21)};
  });
  const p = document.createElement("pre"); p.id = "probe";
  p.textContent = JSON.stringify({imgs, external: [...document.querySelectorAll(
    "[src]:not([src^='data:']), link[href]")].length});
  document.body.appendChild(p);
});</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (scripts/install.sh installs it)")
        pytest.skip("chromium is not installed (scripts/install.sh installs it)")
    return exe


def _run(args: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=60, check=True)


def _check_in_chromium(html_path, tmp_path, images: int) -> None:
    """Dump the DOM (every <img> decoded and visible) and screenshot it (the plot's colours)."""
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", _PROBE + "</body>"))
    dom = _run(["--virtual-time-budget=3000", "--dump-dom", probe.as_uri()]).stdout
    found = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)
                       .replace("&quot;", '"').replace("&amp;", "&"))
    assert found["external"] == 0  # self-contained: nothing but data: URIs
    assert len(found["imgs"]) == images
    for img in found["imgs"]:
        assert img["src"] == "data:image/png;base64"
        assert img["complete"] and min(img["natural"]) > 100, img
        assert min(img["box"]) > 100 and img["visible"], img
    shot = tmp_path / "shot.png"
    _run([f"--screenshot={shot}", "--window-size=1200,2000", html_path.as_uri()])
    from PIL import Image

    pixels = Image.open(shot).convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20)
    assert len(colours) > 200  # not blank: text, axes, markers
    evaluate = tuple(int(render.STAGE_COLOURS["evaluate"][i:i + 2], 16) for i in (1, 3, 5))
    near = sum(n for n, c in colours if max(abs(a - b) for a, b in zip(c, evaluate, strict=True)) < 12)
    assert near > 50  # the evaluate markers of the plot are on screen


def test_report_html_shows_plots_and_search_front(tmp_path):
    r = _compressed()
    r.stages[2].type = "search"
    r.stages[2].images = {"measured Pareto front": "search/front.png"}

    out = render.write_report(r, tmp_path / "run",
                              extra={"search/front.png": render.plot_png(_report())})
    _check_in_chromium(out / "report.html", tmp_path, images=2)


@pytest.mark.slow
def test_real_run_report_in_chromium(tmp_path):
    from slimformer.pipeline import run
    from slimformer.recipe import parse_recipe

    recipe = parse_recipe({
        "name": "vit-digits-seq", "model": {"source": "zoo", "name": "vit-digits-seq"},
        "data": {"eval_limit": 200},
        "stages": [{"type": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 3},
                   {"type": "quantize", "method": "minmax", "weight_bits": 8, "act_bits": 8,
                    "calib_samples": 32},
                   {"type": "export", "latency_batch_sizes": [1], "latency_repeats": 3}],
        "output": {"dir": str(tmp_path / "run")}})
    res = run(recipe)
    head = res.report.headline
    # the export stage times the float model beside the quantized one: a measured ratio
    assert re.fullmatch(r"vit-digits-seq: \d+\.\dx smaller, [+-]\d+\.\d pt, ONNX Runtime "
                        r"(\d+\.\dx (faster|slower) than|as fast as) float \(batch \d+.*\)",
                        head), head
    html = (tmp_path / "run" / "report.html").read_text()
    assert head in html and head in (tmp_path / "run" / "report.md").read_text()
    _check_in_chromium(tmp_path / "run" / "report.html", tmp_path, images=1)
