"""``build_hls(model, config, out_dir, calib_data, eval_data) -> HlsResult``.

Flow: lower the model to hls4ml's operations -> fixed-point types from our quantization (float
tensors: calibration ranges) -> hls4ml project with the pitfall workarounds -> compile (g++) ->
C simulation and our fixed-point reference on the evaluation set -> estimate -> synthesis when a
tool is on PATH, else the exact command to run it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimformer.errors import DataError, HardwareError
from slimformer.hardware.config import HlsConfig
from slimformer.hardware.estimate import Estimate, estimate, part_resources
from slimformer.hardware.graph import HlsGraph
from slimformer.hardware.lowering import lower
from slimformer.hardware.precision import Precisions, assign
from slimformer.hardware.synth import SynthReport, find_report, find_tool, parse_csynth_xml, synth_command


@dataclass
class CsimResult:
    """C simulation against the float model and our fixed-point reference."""

    rows: int
    accuracy_float: float | None
    accuracy_quantized: float | None  # our fake-quantized model (None for a float input)
    accuracy_csim: float | None
    accuracy_reference: float | None
    agreement_reference: float  # C-sim vs our fixed-point reference predictions
    agreement_float: float  # C-sim vs float model predictions
    max_error: float  # |C-sim - reference| over all outputs
    mean_error: float
    max_error_float: float  # |C-sim - float model|
    mean_error_float: float


@dataclass
class HlsResult:
    """An hls4ml project and what we know about it."""

    project_dir: Path
    graph: HlsGraph
    precisions: Precisions
    estimate: Estimate
    csim: CsimResult | None
    synth_tool: str | None
    synth_command: str
    synthesis: SynthReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    hls_model: object = None  # hls4ml ModelGraph (compiled)


def _split(model: nn.Module):
    from slimformer.quantize.state import QuantizedModel

    if isinstance(model, QuantizedModel):
        return model.model, model
    return model, None


def _inputs(data, rows: int | None) -> dict[str, torch.Tensor]:
    inputs = getattr(data, "inputs", None)
    if not isinstance(inputs, dict):
        raise DataError("hls data must be a TensorDictDataset (inputs dict + labels)")
    return {k: v[:rows] if rows else v for k, v in inputs.items()}


CSIM_CHUNK = 64  # rows per C-simulation call: one progress tick each


def _predict_hls(hls_model, x: dict[str, torch.Tensor], names: list[str],
                 tick=lambda done, total: None) -> torch.Tensor:
    """C-simulated outputs ``(rows, outputs)``, in chunks of ``CSIM_CHUNK`` rows."""
    rows = len(x[names[0]])
    parts = []
    for start in range(0, rows, CSIM_CHUNK):
        arrays = [np.ascontiguousarray(x[n][start:start + CSIM_CHUNK].numpy().astype(np.float32))
                  for n in names]
        y = hls_model.predict(arrays[0] if len(arrays) == 1 else arrays)
        parts.append(torch.tensor(np.asarray(y, dtype=np.float64)).reshape(len(arrays[0]), -1))
        tick(min(start + CSIM_CHUNK, rows), rows)
    return torch.cat(parts)


def build_hls(model: nn.Module, config: HlsConfig, out_dir: str | Path, calib_data,
              eval_data=None, compile: bool = True, run_synthesis: bool = True,
              progress: Callable[[str, int, int], None] | None = None) -> HlsResult:
    """Build, compile, C-simulate and estimate an hls4ml project of ``model``.

    Args:
        model: A :class:`~slimformer.quantize.state.QuantizedModel` (its quantizers give the
            types; quantize with ``power_of_two_scales`` for an exact mapping) or a float model.
        config: Backend, part, clock, reuse factors, strategy.
        out_dir: Project folder (replaced).
        calib_data: Data set for the ranges of tensors left in float (first
            ``config.calib_samples`` rows).
        eval_data: Data set with labels for the C simulation (None: skip).
        compile: Compile with g++ (needed for C simulation); else only write the project.
        run_synthesis: Run synthesis when a tool for the backend is on PATH.
        progress: ``progress(step, done, total)`` callback (project, g++, C-sim rows, synthesis).

    Raises:
        HardwareError: Unsupported operations (listed by module path), unmappable quantizers.
    """
    from slimformer.hardware.project import build_model_graph, check_reuse_patterns
    from slimformer.hardware.reference import reference_outputs

    tick = progress or (lambda *a: None)
    t0 = time.perf_counter()
    tick("hls: project", 0, 1)
    base, qmodel = _split(model)
    base.eval()
    calib = _inputs(calib_data, config.calib_samples)
    graph = lower(base, {k: v[:1] for k, v in calib.items()}, config.gelu)
    missing = [n for n in graph.input_keys if n not in calib]
    if missing:
        raise DataError(f"the data has no input(s) {missing}; it has {sorted(calib)}")
    check_reuse_patterns(graph, config)
    prec = assign(graph, qmodel, calib, config)
    config, reuse_note = _resolve_reuse(graph, prec, config)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = {"lower": time.perf_counter() - t0}
    hls_model = build_model_graph(graph, prec, config, out)
    est = estimate(graph, prec, config)
    notes = list(prec.notes) + ([reuse_note] if reuse_note else [])
    gelus = sorted({o.module for o in graph.ops if o.attrs.get("gelu")})
    if gelus:
        notes.append(f"GELU replaced by x * sigmoid(1.702 x) (gelu: sigmoid; max abs error 0.02) "
                     f"at: {', '.join(gelus)}")
    avail = part_resources(config.part)
    if avail and (est.dsp > avail[0] or est.lut > avail[1]):
        notes.append(f"estimate: {est.dsp:,} DSP / {est.lut:,} LUT exceed {config.part} "
                     f"({avail[0]:,} / {avail[1]:,}): raise reuse factors (reuse_overrides)")
    csim = None
    tick("hls: project", 1, 1)
    if not compile:
        hls_model.write()
    else:
        t1 = time.perf_counter()
        tick("hls: compile (g++)", 0, 1)
        try:
            hls_model.compile()
        except Exception as e:  # noqa: BLE001 - g++ / hls4ml raise plain exceptions
            raise HardwareError(f"compiling the hls4ml project in {out} failed: {e}") from e
        tick("hls: compile (g++)", 1, 1)
        seconds["compile"] = time.perf_counter() - t1
        if eval_data is not None:
            t1 = time.perf_counter()
            csim = _csim(hls_model, graph, prec, config, base, qmodel, eval_data,
                         reference_outputs, lambda d, t: tick("hls: C-simulation", d, t))
            seconds["csim"] = time.perf_counter() - t1
    tool = find_tool(config.backend)
    cmd = synth_command(config.backend, out)
    synthesis = None
    if tool and run_synthesis:
        tick("hls: synthesis", 0, 1)
        hls_model.build(csim=False, synth=True, export=False)
        tick("hls: synthesis", 1, 1)
        rep = find_report(out, config.project_name)
        synthesis = parse_csynth_xml(rep) if rep else None
    elif not tool:
        notes.append(f"no {' / '.join(_names(config.backend))} on PATH: synthesis not run; "
                     f"run: {cmd}")
    seconds["total"] = time.perf_counter() - t0
    return HlsResult(out, graph, prec, est, csim, tool, cmd, synthesis, seconds, notes, hls_model)


def _resolve_reuse(graph, prec, config: HlsConfig) -> tuple[HlsConfig, str | None]:
    """``reuse_factor: auto`` -> the smallest power of two whose estimate fits the part."""
    if config.reuse_factor != "auto":
        return config, None
    avail = part_resources(config.part)
    if avail is None:
        return config.model_copy(update={"reuse_factor": 1}), (
            f"reuse factor auto: 1 ({config.part} has no resource table here to fit against)")
    for r in (2 ** k for k in range(13)):
        cfg = config.model_copy(update={"reuse_factor": r})
        est = estimate(graph, prec, cfg)
        if est.dsp <= 0.9 * avail[0] and est.lut <= 0.9 * avail[1]:
            return cfg, (f"reuse factor auto: {r} (estimate {est.dsp:,} DSP / {est.lut:,} LUT of "
                         f"{avail[0]:,} / {avail[1]:,} on {config.part})")
    cfg = config.model_copy(update={"reuse_factor": 4096})
    return cfg, (f"reuse factor auto: even 4096 does not fit {config.part} by the estimate; "
                 "choose a larger part or the Resource strategy")


def _names(backend: str) -> tuple[str, ...]:
    from slimformer.hardware.synth import TOOLS

    return TOOLS[backend]


def _csim(hls_model, graph, prec, config, base, qmodel, eval_data, reference_outputs,
          tick) -> CsimResult:
    from slimformer.models.outputs import require_class_scores as scores

    x = _inputs(eval_data, None)
    labels = getattr(eval_data, "labels", None)
    tick(0, len(x[graph.input_keys[0]]))
    y_hls = _predict_hls(hls_model, x, graph.input_keys, tick)
    with torch.no_grad():
        y_ref = reference_outputs(graph, prec, x, config.table_size)[graph.outputs[0]]
        y_ref = y_ref.reshape(len(y_hls), -1)
        y_float = scores(base(**x)).double().reshape(len(y_hls), -1) if qmodel is None else None
        if qmodel is not None:
            mode = [(m, m.mode) for m in qmodel.quant.modules() if hasattr(m, "mode")]
            qmodel.quant.set_mode("float")
            y_float = scores(qmodel(**x)).double().reshape(len(y_hls), -1)
            for m, md in mode:
                m.mode = md
                if hasattr(m, "_cache"):
                    m._cache = None
            y_q = scores(qmodel(**x)).double().reshape(len(y_hls), -1)
    if not torch.isfinite(y_hls).all():
        raise HardwareError("the C simulation produced NaN or inf")

    def acc(y):
        return None if labels is None else float((y.argmax(1) == labels).double().mean())

    err = (y_hls - y_ref).abs()
    err_f = (y_hls - y_float).abs()
    return CsimResult(
        rows=len(y_hls), accuracy_float=acc(y_float),
        accuracy_quantized=acc(y_q) if qmodel is not None else None,
        accuracy_csim=acc(y_hls), accuracy_reference=acc(y_ref),
        agreement_reference=float((y_hls.argmax(1) == y_ref.argmax(1)).double().mean()),
        agreement_float=float((y_hls.argmax(1) == y_float.argmax(1)).double().mean()),
        max_error=float(err.max()), mean_error=float(err.mean()),
        max_error_float=float(err_f.max()), mean_error_float=float(err_f.mean()))


def summary(res: HlsResult) -> dict:
    """Flat report metrics of an :class:`HlsResult` (C-sim, estimate, synthesis)."""
    e = res.estimate
    out: dict = {"project": str(res.project_dir), "layers": len(res.graph.ops),
                 "estimate_label": e.label, "estimate_cycles": e.cycles,
                 "estimate_latency_us": round(e.latency_us, 4), "clock_mhz": e.clock_mhz,
                 "estimate_dsp": e.dsp, "estimate_lut": e.lut,
                 "synthesis_tool": res.synth_tool or "none on PATH",
                 "synthesis_command": res.synth_command}
    if res.csim is not None:
        c = res.csim
        out.update({f"csim_{k}": (round(v, 6) if isinstance(v, float) else v)
                    for k, v in vars(c).items()})
    if res.synthesis is not None:
        s = res.synthesis
        out.update(synth_latency_cycles=s.latency_worst, synth_latency_ns=s.latency_ns,
                   synth_interval=s.interval_max, synth_dsp=s.dsp, synth_lut=s.lut,
                   synth_ff=s.ff, synth_bram_18k=s.bram_18k)
    return out
