"""What a report says in a few words: the headline and the key facts of each stage.

Everything here is computed from the :class:`~slimformer.report.model.StageRecord` s of a
:class:`~slimformer.report.model.Report`: the first evaluated model is the baseline; size is
``size["bytes"]`` (bit-packed model size, or the ONNX file for an export stage); deployed latency is
an export stage's ``"<runtime> batch=N"`` entry, PyTorch latency a plain ``"batch=N"`` entry, and
PyTorch latency of a quantized model (after a quantize or search stage) is fake-quant simulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimformer.report.model import Report, StageRecord

RUNTIME_NAMES = {"": "PyTorch", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
_COMPRESSING = ("quantize", "qat", "prune", "search")
_QUANTIZING = ("quantize", "search")


@dataclass(frozen=True)
class Latency:
    """One latency entry of a stage: runtime display name, batch size, median ms, simulated?"""

    runtime: str
    batch: int
    median_ms: float
    simulated: bool

    @property
    def deployed(self) -> bool:
        """Measured in a deployment runtime (not PyTorch)."""
        return self.runtime != "PyTorch"

    def text(self) -> str:
        """E.g. ``"ONNX Runtime 2.10 ms"`` or ``"PyTorch 11.3 ms (simulated)"``."""
        return f"{self.runtime} {ms(self.median_ms)}" + (" (simulated)" if self.simulated else "")


def parse_latency_key(key: str) -> tuple[str, int]:
    """``"onnxruntime batch=32"`` -> ``("ONNX Runtime", 32)``; ``"batch=1"`` -> ``("PyTorch", 1)``."""
    runtime, _, batch = key.rpartition(" ")
    base, floated = runtime.removesuffix(" float"), runtime.endswith(" float")
    name = RUNTIME_NAMES.get(base, base) + (" float" if floated else "")
    return name, int(batch.split("=", 1)[1])


def quantized_at(report: Report) -> list[bool]:
    """Per stage: whether the model that stage measured is quantized."""
    applied = report.model.get("applied_stages") or []
    q = any(a in _QUANTIZING for a in applied)
    out = []
    for s in report.stages:
        out.append(q)
        q = q or s.type in _QUANTIZING
    return out


def latencies(report: Report) -> list[list[Latency]]:
    """Per stage: its latency entries, PyTorch ones of quantized models marked simulated."""
    out = []
    for s, q in zip(report.stages, quantized_at(report), strict=True):
        rows = []
        for key, stats in s.latency.items():
            runtime, batch = parse_latency_key(key)
            rows.append(Latency(runtime, batch, float(stats.get("median_ms", math.nan)),
                                simulated=q and runtime == "PyTorch"))
        out.append(rows)
    return out


def main_batch(report: Report) -> int | None:
    """The batch size the summary shows: 1 where measured, else the smallest measured."""
    batches = {parse_latency_key(k)[1] for s in report.stages for k in s.latency}
    return (1 if 1 in batches else min(batches)) if batches else None


def shown_batch(report: Report) -> int | None:
    """The batch of the stage table and the latency plot (the headline's).

    Where a runtime was timed: the largest batch every such stage measured; else
    :func:`main_batch` (PyTorch latencies only).
    """
    sets = [{x.batch for x in lats if x.deployed} for lats in latencies(report)
            if any(x.deployed for x in lats)]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else main_batch(report)


def first_compressing(report: Report) -> int:
    """Index of the first quantize / prune / search stage (``len(stages)`` when none)."""
    return next((i for i, s in enumerate(report.stages) if s.type in _COMPRESSING),
                len(report.stages))


def quality_metric(report: Report) -> str | None:
    """The metric that plots and rows compare: ``accuracy``, else output SQNR, else agreement."""
    for key in ("accuracy", "output_sqnr_db_min", "agreement_with_float", "agreement"):
        if any(finite(s.metrics.get(key)) for s in report.stages[1:] or report.stages):
            return key
    return None


def quality_text(s: StageRecord) -> str:
    """Accuracy (or output fidelity) of one stage, e.g. ``"0.8730"`` or ``"SQNR 31.2 dB"``."""
    m = s.metrics
    if finite(m.get("accuracy")):
        return f"{m['accuracy']:.4f}"
    if finite(m.get("val_accuracy")):
        return f"{m['val_accuracy']:.4f} (validation rows)"
    if finite(m.get("output_sqnr_db_min")):
        return f"SQNR {m['output_sqnr_db_min']:.1f} dB, cosine {m.get('output_cosine_min', 0):.4f}"
    for key in ("agreement_with_float", "agreement_with_pytorch", "agreement"):
        if finite(m.get(key)):
            return f"{key.replace('_', ' ')} {m[key]:.4f}"
    return ""


def size_text(s: StageRecord) -> str:
    """``"1.21 MB"`` (``"ONNX file 0.30 MB"`` for an export stage), or ``""``."""
    if "bytes" not in s.size:
        return ""
    return ("ONNX file " if s.type == "export" else "") + nbytes(s.size["bytes"])


def nbytes(n: float) -> str:
    """Human-readable bytes: ``"812 B"``, ``"45.3 kB"``, ``"1.21 MB"``."""
    if n < 1e3:
        return f"{n:.0f} B"
    return f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.2f} MB"


def ms(v: float) -> str:
    """Milliseconds: ``"1.00 ms"``, ``"11.3 ms"``, ``"250 ms"``."""
    return f"{v:.2f} ms" if v < 10 else f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def headline(report: Report) -> str:
    """One line: size x vs the first evaluated model, accuracy delta, deployed latency ratio.

    E.g. ``"vit-fmnist: 6.7x smaller, -0.5 pt, ONNX Runtime 1.4x faster than float"``. Without
    labels the accuracy delta becomes the final output SQNR vs the float model. A stage that lost
    more than the run's budget adds ``"; WARNING: ..."`` with its warnings.
    """
    stages = report.stages
    first_comp = first_compressing(report)
    base_i = next((i for i, s in enumerate(stages[:first_comp]) if s.type == "evaluate"), None)
    if base_i is None:  # the input model was not evaluated: its size is still known
        base_i, later = 0, stages
        base = StageRecord(index=-1, type="evaluate", size={"bytes": report.model["bytes"]}
                           if report.model.get("bytes") else {})
    else:
        base, later = stages[base_i], stages[base_i + 1:]
    parts = [p for p in (_size_part(base, later), _quality_part(base, later),
                         _latency_part(report, base_i)) if p]
    if first_comp == len(stages):
        parts.insert(0, "no compression stage")
    warnings = [w for s in stages for w in s.warnings]  # a loss past the budget (max_loss)
    warning = "; WARNING: " + "; ".join(warnings) if warnings else ""
    return f"{report.name}: " + ", ".join(parts) + warning


def _size_part(base: StageRecord, later: list[StageRecord]) -> str:
    final = next((s for s in reversed(later) if s.type != "export" and "bytes" in s.size), None)
    final = final or next((s for s in reversed(later) if "bytes" in s.size), None)
    if final is None or not base.size.get("bytes") or not final.size["bytes"]:
        return nbytes(base.size["bytes"]) if base.size.get("bytes") else ""
    r = base.size["bytes"] / final.size["bytes"]
    what = " (ONNX file)" if final.type == "export" else ""
    if abs(r - 1) < 0.05:
        return f"same size{what}"
    return f"{r:.1f}x smaller{what}" if r > 1 else f"{1 / r:.1f}x larger{what}"


def _quality_part(base: StageRecord, later: list[StageRecord]) -> str:
    final = next((s for s in reversed(later) if finite(s.metrics.get("accuracy"))), None)
    if final is not None and finite(base.metrics.get("accuracy")):
        d = 100 * (final.metrics["accuracy"] - base.metrics["accuracy"])
        return f"{d:+.1f} pt"
    if not later and finite(base.metrics.get("accuracy")):
        return f"accuracy {base.metrics['accuracy']:.4f}"
    if final is not None and base.index < 0:
        return f"accuracy {final.metrics['accuracy']:.4f} (input model not evaluated)"
    final = next((s for s in reversed(later) if finite(s.metrics.get("output_sqnr_db_min"))),
                 None)
    if final is not None:
        return f"output SQNR {final.metrics['output_sqnr_db_min']:.1f} dB vs float"
    final = next((s for s in reversed(later) if finite(s.metrics.get("agreement"))), None)
    return f"agreement {final.metrics['agreement']:.3f} with float" if final else ""


def _latency_part(report: Report, base_i: int) -> str:
    lats, quant = latencies(report), quantized_at(report)
    deployed_i = next((i for i in reversed(range(base_i, len(lats)))
                       if any(x.deployed for x in lats[i])), None)
    first_comp = first_compressing(report)
    ref = "float" if not quant[base_i] else "the input model"
    if deployed_i is not None:
        here = [x for x in lats[deployed_i] if x.deployed]
        final = [x for x in here if not x.runtime.endswith(" float")]
        if deployed_i < first_comp:  # the input model itself deployed: no comparison
            return _at(final, min(x.batch for x in final))
        # the float model timed beside it in the same stage (interleaved), else an earlier export
        pairs = {(x.runtime.removesuffix(" float"), x.batch): x for x in here
                 if x.runtime.endswith(" float")}
        if not pairs:
            baseline = next((lats[i] for i in range(first_comp)
                             if any(x.deployed for x in lats[i])), None)
            pairs = {(x.runtime, x.batch): x for x in baseline or [] if x.deployed}
        common = [x for x in final if (x.runtime, x.batch) in pairs]
        if not common:
            b = min(x.batch for x in final)
            return _at(final, b) + f" ({ref} not deployed to compare)"
        b = max(x.batch for x in common)  # throughput batch first, the others after it
        texts = [_ratio(x.runtime, pairs[(x.runtime, b)].median_ms / x.median_ms, ref)
                 for x in common if x.batch == b]
        named = len({x.runtime for x in common}) > 1  # several runtimes: "at batch 1: A 1.0x, B"
        rest = []
        for other in sorted({x.batch for x in common if x.batch != b}):
            r = [(f"{x.runtime} " if named else "")
                 + f"{pairs[(x.runtime, other)].median_ms / x.median_ms:.1f}x"
                 for x in common if x.batch == other]
            rest.append(f"at batch {other}: " + ", ".join(r) if named
                        else f"{r[0]} at batch {other}")
        return ", ".join(texts) + f" (batch {b}" + "".join(f"; {r}" for r in rest) + ")"
    torch = [(i, x) for i in range(base_i, len(lats)) for x in lats[i] if x.runtime == "PyTorch"]
    if not torch:
        return ""
    last_i = torch[-1][0]
    if quant[last_i]:
        return "latency PyTorch-simulated only (no export stage)"
    b = main_batch(report)
    base_x = next((x for i, x in torch if i == base_i and x.batch == b), None)
    last_x = next((x for i, x in torch if i == last_i and x.batch == b), None)
    if last_i == base_i or base_x is None or last_x is None:
        return _at([x for i, x in torch if i == last_i], b)
    return _ratio("PyTorch", base_x.median_ms / last_x.median_ms, ref)


def _at(rows: list[Latency], batch: int | None) -> str:
    rows = [x for x in rows if x.batch == batch] or rows
    return ", ".join(x.text() for x in rows) + (f" at batch {rows[0].batch}" if rows else "")


def _ratio(runtime: str, r: float, ref: str) -> str:
    if abs(r - 1) < 0.05:
        return f"{runtime} as fast as {ref}"
    return f"{runtime} {r:.1f}x faster than {ref}" if r > 1 else \
        f"{runtime} {1 / r:.1f}x slower than {ref}"


def finite(v) -> bool:
    """A real, finite number (not a bool, not None, not NaN or inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
