"""Synthesis: find Vivado/Vitis HLS, the command to run, and parse the reports they write.

Parses the ``<top>_csynth.xml`` (Vivado HLS and Vitis HLS write the same schema) and hls4ml's
baseline JSON (``{"CSynthesisReport": {...}}``). Latency is reported in cycles and in ns.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET  # noqa: N817
from dataclasses import dataclass
from pathlib import Path

from slimformer.errors import HardwareError

TOOLS = {"Vivado": ("vivado_hls",), "Vitis": ("vitis-run", "vitis_hls")}


@dataclass(frozen=True)
class SynthReport:
    """Numbers of one C synthesis report."""

    tool: str
    part: str
    target_clock_ns: float
    estimated_clock_ns: float
    latency_best: int
    latency_worst: int
    interval_min: int
    interval_max: int
    bram_18k: int
    dsp: int
    ff: int
    lut: int
    uram: int = 0

    @property
    def latency_ns(self) -> float:
        """Worst-case latency in ns at the target clock."""
        return self.latency_worst * self.target_clock_ns


def find_tool(backend: str) -> str | None:
    """The synthesis executable for ``backend`` on PATH, or None."""
    for exe in TOOLS[backend]:
        if shutil.which(exe):
            return exe
    return None


def synth_command(backend: str, project_dir: Path) -> str:
    """The exact shell command that synthesizes the project (as hls4ml's ``build()`` runs it)."""
    if backend == "Vivado":
        run = ('vivado_hls -f build_prj.tcl "reset=1 csim=0 synth=1 cosim=0 validation=0 '
               'export=0 vsynth=0 fifo_opt=0"')
    else:
        run = ("vitis-run --tcl build_prj.tcl --mode hls   # Vitis >= 2024.2; older Vitis HLS: "
               'vitis_hls -f build_prj.tcl "reset=1 csim=0 synth=1 cosim=0 validation=0 '
               'export=0 vsynth=0"')
    return f"cd {project_dir} && {run}"


def _num(node, path: str, cast=float, default=None):
    el = node.find(path)
    if el is None or el.text is None:
        if default is not None:
            return default
        raise HardwareError(f"synthesis report has no {path}")
    text = el.text.strip()
    return cast(float(text)) if cast is int else cast(text)


def parse_csynth_xml(path: str | Path) -> SynthReport:
    """Parse a ``*_csynth.xml`` written by Vivado HLS or Vitis HLS."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise HardwareError(f"cannot read synthesis report {path}: {e}") from e
    perf = root.find("PerformanceEstimates")
    area = root.find("AreaEstimates/Resources")
    if perf is None or area is None:
        raise HardwareError(f"{path} is not a C synthesis report (no PerformanceEstimates / "
                            "AreaEstimates)")
    lat = "SummaryOfOverallLatency/"
    return SynthReport(
        tool=f"{_num(root, 'ReportVersion/Version', str, '?')}",
        part=_num(root, "UserAssignments/Part", str, "?"),
        target_clock_ns=_num(root, "UserAssignments/TargetClockPeriod"),
        estimated_clock_ns=_num(perf, "SummaryOfTimingAnalysis/EstimatedClockPeriod"),
        latency_best=_num(perf, lat + "Best-caseLatency", int),
        latency_worst=_num(perf, lat + "Worst-caseLatency", int),
        interval_min=_num(perf, lat + "Interval-min", int),
        interval_max=_num(perf, lat + "Interval-max", int),
        bram_18k=_num(area, "BRAM_18K", int), dsp=_num(area, "DSP", int, 0)
        if area.find("DSP") is not None else _num(area, "DSP48E", int),
        ff=_num(area, "FF", int), lut=_num(area, "LUT", int), uram=_num(area, "URAM", int, 0))


def parse_baseline_json(path: str | Path) -> SynthReport:
    """Parse an hls4ml synthesis baseline (``{"CSynthesisReport": {...}}``, values as strings)."""
    try:
        r = json.loads(Path(path).read_text())["CSynthesisReport"]
    except (OSError, ValueError, KeyError) as e:
        raise HardwareError(f"{path} is not an hls4ml CSynthesisReport JSON: {e}") from e

    def i(k):
        return int(float(r[k]))

    return SynthReport(tool="hls4ml baseline", part="?",
                       target_clock_ns=float(r["TargetClockPeriod"]),
                       estimated_clock_ns=float(r["EstimatedClockPeriod"]),
                       latency_best=i("BestLatency"), latency_worst=i("WorstLatency"),
                       interval_min=i("IntervalMin"), interval_max=i("IntervalMax"),
                       bram_18k=i("BRAM_18K"), dsp=i("DSP"), ff=i("FF"), lut=i("LUT"),
                       uram=i("URAM") if "URAM" in r else 0)


def find_report(project_dir: Path, project_name: str) -> Path | None:
    """The top-level csynth XML of a synthesized hls4ml project, if any."""
    hits = sorted(Path(project_dir).glob(f"{project_name}_prj/solution1/syn/report/"
                                         f"{project_name}_csynth.xml"))
    return hits[0] if hits else None
