"""Every stage on every model of the generality set: a matrix of what works and what refuses.

Usage::

    .venv/bin/python benchmarks/generality.py [--models bert,swin] [--out runs/generality]

For each model of :data:`slimformer.models.generality.GENERALITY` (weights re-initialized with
:func:`~slimformer.models.generality.fan_in_init`, so quantization error shows in the outputs):

- discovery: norm->Linear pairs, attention sites, heads, MLPs, modules run more than once;
- W8A8 and W4A4 output SQNR (dB, min over all outputs vs float on held-out rows, on a seeded RNG)
  for minmax, repq and repquant (few steps);
- float and QDQ (W8A8 repq) ONNX export: parity (float cosine; QDQ share of values within one
  output step) and graph outputs kept vs model outputs;
- magnitude pruning at ratio 0.5 without fine-tuning: achieved prunable reduction and what was
  cut (its headline);
- the search space the NAS stage builds (its size) or its refusal.

A cell that fails records the typed error's class and message (a refusal); an exception that is
not a :class:`~slimformer.errors.SlimformerError` is a bug cell (``BUG``). Writes
``matrix.md`` and ``matrix.json`` under ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.errors import SlimformerError
from slimformer.models.generality import GENERALITY, fan_in_init
from slimformer.models.loading import load_model
from slimformer.models.outputs import OutputStats, leaves, seeded_forward
from slimformer.models.structure import discover

METHODS = ("minmax", "repq", "repquant")
BITS = ((8, 8), (4, 4))
CALIB_ROWS, EVAL_ROWS, STEPS = 16, 64, 5  # 8 rows x 2 logits read +-2 dB of noise
PRECISE = ("cosine", "within_1_step")


def cell(fn):
    """``fn()`` as a cell: its dict, or the typed refusal, or a bug record (with timing)."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except SlimformerError as exc:
        out = {"error": type(exc).__name__, "message": " ".join(str(exc).split())[:240]}
    except Exception as exc:  # noqa: BLE001 - an untyped failure is what this matrix looks for
        out = {"bug": type(exc).__name__, "message": " ".join(str(exc).split())[:240]}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def compare(model, qmodel, x: dict) -> dict:
    """All outputs of ``qmodel`` vs ``model`` on ``x`` (same random draws): min cosine/SQNR."""
    stats = OutputStats()
    with torch.no_grad():
        stats.add(leaves(seeded_forward(model, x)), leaves(seeded_forward(qmodel, x)))
    res = stats.result()
    return {"sqnr_db": res["sqnr_db"], "cosine": res["cosine"],
            "worst_output": min(res["outputs"], key=lambda k: res["outputs"][k]["sqnr_db"])}


def setup(name: str):
    """The fan-in initialized model, its calibration set, held-out inputs and structure."""
    lm = load_model(GENERALITY[name])
    model = lm.module
    x2 = lm.example_inputs(2, seed=0)
    fan_in_init(model, x2)
    calib_x = lm.example_inputs(CALIB_ROWS, seed=1)
    calib = TensorDictDataset(calib_x, torch.zeros(CALIB_ROWS, dtype=torch.long))
    return lm, model, calib, lm.example_inputs(EVAL_ROWS, seed=2), x2


def discovery(model, x2) -> dict:
    """Discovery counts on two example rows."""
    s = discover(model, x2, require_attention=False)
    return {"pairs": s.norm_linear_pairs, "norms": len(s.norms), "attention": len(s.attention),
            "heads": sorted({a.heads for a in s.attention}), "mlps": len(s.mlps),
            "linears": len(s.linears), "shared": len(s.shared),
            "max_calls": max(s.shared.values(), default=1)}


def quant(model, calib, x, method: str, wb: int, ab: int) -> dict:
    """Output SQNR of one method at one bit-width on held-out rows."""
    from slimformer.quantize.api import quantize
    from slimformer.quantize.config import QuantConfig

    cfg = QuantConfig(method=method, weight_bits=wb, act_bits=ab, calib_samples=CALIB_ROWS,
                      clip_steps=STEPS, recon_steps=STEPS)
    res = quantize(model, cfg, calib)
    return {**compare(model, res.model, x), "weak_sites": len(res.weak_sites)}


def _graph_outputs(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.output)


def export(model, calib, x2, tmp: Path) -> tuple[dict, dict]:
    """Float and QDQ export cells: parity, and graph outputs kept of the model's outputs."""
    from slimformer.export.onnx import export_onnx
    from slimformer.quantize.api import quantize
    from slimformer.quantize.config import QuantConfig
    from slimformer.quantize.inference import to_inference

    with torch.no_grad():
        n_out = len(leaves(seeded_forward(model, x2)))

    def float_cell():
        r = export_onnx(model, tmp / "f.onnx", x2)
        return {"cosine": min(p["cosine"] for p in r.parity.values()),
                "outputs": f"{_graph_outputs(tmp / 'f.onnx')}/{n_out}",
                "warnings": len(r.warnings)}

    def qdq_cell():
        inf = to_inference(quantize(model, QuantConfig(method="repq", calib_samples=CALIB_ROWS),
                                    calib).model)
        r = export_onnx(inf, tmp / "q.onnx", x2)
        return {"within_1_step": min(p["within_1_step"] for p in r.parity.values()),
                "cosine": min(p["cosine"] for p in r.parity.values()),
                "outputs": f"{_graph_outputs(tmp / 'q.onnx')}/{n_out}",
                "integer_matmuls": r.fusion.get("integer_matmuls")}

    return cell(float_cell), cell(qdq_cell)


def prune_cell(model, x2) -> dict:
    """Magnitude pruning at ratio 0.5 without fine-tuning."""
    from slimformer.prune.api import prune
    from slimformer.prune.config import PruneConfig

    res = prune(model, PruneConfig(method="magnitude", finetune_steps=0, ratio=0.5), inputs=x2)
    return {"reduction": round(res.reduction, 3),
            "params": f"{res.params_before}->{res.params_after}",
            "heads_cut": sum(k < t for k, t in res.kept["heads"].values()),
            "mlps_cut": sum(k < t for k, t in res.kept["mlp"].values()),
            "skipped": {k: len(v) for k, v in res.skipped.items()},
            "headline": getattr(res, "headline", "")}


def search_cell(model, calib) -> dict:
    """The NAS search space the search stage would build (no training)."""
    from slimformer.nas.api import _prepare
    from slimformer.nas.config import SearchConfig

    _, space, _, notes = _prepare(model, SearchConfig(), calib, None)
    return {"size": space.size(), "blocks": len(space.blocks), "notes": len(notes)}


def run_model(name: str, tmp: Path) -> dict:
    """Every cell of one model."""
    row: dict = {"model": name}
    t0 = time.perf_counter()
    try:
        lm, model, calib, x, x2 = setup(name)
    except Exception as exc:  # noqa: BLE001 - the row records it
        row["load"] = {"bug" if not isinstance(exc, SlimformerError) else "error":
                       type(exc).__name__, "message": str(exc)[:240]}
        return row
    row["discovery"] = cell(lambda: discovery(model, x2))
    for wb, ab in BITS:
        for m in METHODS:
            row[f"w{wb}a{ab}-{m}"] = cell(lambda m=m, wb=wb, ab=ab: quant(model, calib, x, m, wb,
                                                                           ab))
    row["onnx-float"], row["onnx-qdq"] = export(model, calib, x2, tmp)
    row["prune"] = cell(lambda: prune_cell(model, x2))
    row["search"] = cell(lambda: search_cell(model, calib))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _fmt(c: dict | None, key: str) -> str:
    if c is None:
        return ""
    if "bug" in c:
        return f"BUG {c['bug']}"
    if "error" in c:
        return f"refused: {c['error']}"
    v = c.get(key)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.1f}" if key == "sqnr_db" else f"{v:.4f}" if key in PRECISE else f"{v:.2f}"
    return str(v)


def table(rows: list[dict]) -> str:
    """The matrix as a Markdown table."""
    cols = ["model", "pairs", "attn", "heads", "MLPs", "shared"]
    cols += [f"W{wb}A{ab} {m}" for wb, ab in BITS for m in METHODS]
    cols += ["ONNX float cos", "outs", "QDQ 1-step", "outs", "prune", "search space"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "load" in r:
            lines.append(f"| {r['model']} | " + _fmt(r["load"], "") + " |" * (len(cols) - 1))
            continue
        d = r["discovery"]
        disc = ([_fmt(d, k) for k in ("pairs", "attention")] +
                [",".join(map(str, d["heads"])) if "heads" in d else _fmt(d, "heads")] +
                [_fmt(d, "mlps"), f"{d['shared']} (x{d['max_calls']})" if "shared" in d
                 else _fmt(d, "shared")])
        q = [_fmt(r[f"w{wb}a{ab}-{m}"], "sqnr_db") for wb, ab in BITS for m in METHODS]
        f, qd, p = r["onnx-float"], r["onnx-qdq"], r["prune"]
        ex = [_fmt(f, "cosine"), _fmt(f, "outputs"), _fmt(qd, "within_1_step"),
              _fmt(qd, "outputs")]
        pr = _fmt(p, "reduction") + ("x" if "reduction" in p else "")
        if p.get("skipped"):
            pr += " (not cut: " + ", ".join(f"{k} at {n}" for k, n in p["skipped"].items()) + ")"
        lines.append("| " + " | ".join([r["model"], *disc, *q, *ex, pr,
                                         _fmt(r["search"], "size")]) + " |")
    return "\n".join(lines)


def failures(rows: list[dict]) -> list[str]:
    """One line per refused or bug cell: ``model / cell: Class: message``."""
    out = []
    for r in rows:
        for k, c in r.items():
            if isinstance(c, dict) and ("error" in c or "bug" in c):
                kind = "BUG " + c["bug"] if "bug" in c else c["error"]
                out.append(f"- {r['model']} / {k}: {kind}: {c['message']}")
    return out


def cpu_model() -> str:
    """The CPU model name from ``lscpu`` (or the platform's processor string)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in text.splitlines()
                    if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run the matrix; print it; write ``matrix.md`` / ``matrix.json`` under ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: the whole set)")
    ap.add_argument("--out", default="runs/generality", help="output folder")
    args = ap.parse_args(argv)
    names = args.models.split(",") if args.models else list(GENERALITY)
    unknown = [n for n in names if n not in GENERALITY]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; the set has: {', '.join(GENERALITY)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    head = (f"Generality matrix, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
            f"{cpu_model()}, torch {torch.__version__}. SQNR in dB (min over outputs, held-out "
            "rows, fan-in init).")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for n in names:
            rows.append(run_model(n, Path(tmp)))
            print(f"{n}: {rows[-1].get('seconds', '?')} s", file=sys.stderr, flush=True)
            md = write(out, head, rows)  # after every model: a long run keeps what it measured
    print(md)
    return 0


def write(out: Path, head: str, rows: list[dict]) -> str:
    """Write ``matrix.md`` and ``matrix.json``; returns the Markdown."""
    md = "\n".join([head, "", table(rows), "", "Refusals and bugs:", *failures(rows), ""])
    (out / "matrix.md").write_text(md)
    (out / "matrix.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1,
                                                default=str))
    return md


if __name__ == "__main__":
    raise SystemExit(main())
