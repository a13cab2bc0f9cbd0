"""Deployed CPU latency with accuracy beside it: ours per target vs the runtimes' own quantization.

For each task, in one run on this machine (2 threads, models interleaved in the timing rounds):

- float in ONNX Runtime at opset 20 and at opset 23 (standard ``Attention``, where supported);
- float in OpenVINO, f32 and bf16 (bf16 only where the CPU has it), reading the opset-20 file;
- ONNX Runtime's ``quantize_dynamic`` (int8 per-channel weights) and ``quantize_static`` (QDQ,
  per-channel int8 weights, uint8 activations, MinMax on the calibration rows) of that float file;
  ``quantize_dynamic`` of the opset-23 file too, with its defaults (our ``ort-cpu`` float
  file carries ONNX Runtime's ``MultiHeadAttention``, which it leaves alone; the standard
  ``Attention`` it turned into a ``QAttention`` that ONNX Runtime refused to load);
- NNCF's ``quantize`` (``ModelType.TRANSFORMER``, the same calibration rows) of that float file,
  run in OpenVINO (when ``nncf`` imports);
- ours: repq W8A8 with uniform softmax (asymmetric and symmetric) and W7A8, exported for each
  target (``ort-cpu`` at the detected ISA, opset 23 and 20; the ``avx2`` form; ``portable``;
  ``openvino`` read as ONNX and as IR, f32 and bf16 hints), the CLI defaults (``quantize``
  with ``QuantConfig()``, then ``export onnx`` with ``OnnxConfig()``), the same without outlier
  channels, and the defaults made symmetric for the ``openvino`` target (with and without
  outlier channels, f32 and bf16 hints).

Accuracy and agreement with the PyTorch FP32 predictions are measured by the runtime that is timed,
on ``--limit`` test rows. Latency: ``--rounds`` rounds; each round times every model once (the
median of ``--repeats`` runs), the models alternating, their order rotated each round; the table
gives the fastest round (min) and the median round of each, at batch 1 and 32 (text: real
sentences padded to 128 tokens), and the ratio to ORT float at opset 20 for both.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/deploy.py             # minilm-vader, vit-fmnist
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/deploy.py --tasks vit-fmnist --repeats 10
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

from slimformer.data.datasets import get_dataset  # noqa: E402
from slimformer.export.config import OnnxConfig  # noqa: E402
from slimformer.export.onnx import export_onnx  # noqa: E402
from slimformer.export.ortrun import ort_latency, predict  # noqa: E402
from slimformer.export.targets import cpu_info, opset23_supported  # noqa: E402
from slimformer.models.loading import load_model  # noqa: E402
from slimformer.models.spec import ZooSpec  # noqa: E402
from slimformer.pipeline import check_fit, evaluate_model, latency_inputs  # noqa: E402
from slimformer.quantize.api import quantize  # noqa: E402
from slimformer.quantize.config import QuantConfig  # noqa: E402
from slimformer.quantize.inference import to_inference  # noqa: E402

SEQ = 128
THREADS = 2


def batch_inputs(ds, batch: int) -> dict[str, torch.Tensor]:
    """``batch`` real rows; integer (token) inputs padded to ``SEQ`` with a zero mask."""
    out = {}
    for k, v in latency_inputs(ds, batch).items():
        if not v.is_floating_point() and v.dim() == 2:
            pad = torch.zeros(v.shape[0], SEQ, dtype=v.dtype)
            n = min(SEQ, v.shape[1])
            pad[:, :n] = v[:, :n]
            v = pad
        out[k] = v
    return out


def _calib_rows(calib, names, n: int, batch: int = 32) -> list[dict]:
    return [{k: v[i:i + batch].numpy() for k, v in calib.inputs.items() if k in names}
            for i in range(0, min(n, len(calib)), batch)]


def ort_static(float_path: Path, out: Path, calib, n_calib: int) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from slimformer.export.ortrun import session

    rows = _calib_rows(calib, {i.name for i in session(float_path, 1).get_inputs()}, n_calib)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(rows)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)


def ort_dynamic(float_path: Path, out: Path, ops: list[str] | None = None) -> None:
    """ORT's ``quantize_dynamic``; ``ops``: ``op_types_to_quantize`` (None: its defaults)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(float_path), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=ops)


def nncf_quantize(float_path: Path, out: Path, calib, n_calib: int) -> None:
    import nncf
    import openvino as ov

    m = ov.Core().read_model(str(float_path))
    names = {n for i in m.inputs for n in i.get_names()}
    rows = _calib_rows(calib, names, n_calib, batch=1)
    q = nncf.quantize(m, nncf.Dataset(rows), model_type=nncf.ModelType.TRANSFORMER,
                      subset_size=len(rows))
    ov.save_model(q, str(out), compress_to_fp16=False)


def _try(rows_notes: list, label: str, fn):
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a peer that fails here is reported, not fatal
        rows_notes.append(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        return None
    return time.perf_counter() - t0


def run_task(name: str, repeats: int, n_calib: int, limit: int, d: Path, notes: list,
             rounds: int = 5) -> list[dict]:
    from slimformer.export.openvino import export_openvino, ov_latency, ov_predict

    lm = load_model(ZooSpec(name=name))
    calib, test = get_dataset(lm.dataset, "calib"), get_dataset(lm.dataset, "test", limit)
    check_fit(lm, calib)
    check_fit(lm, test)
    torch_preds, labels = evaluate_model(lm.module, test)
    example = latency_inputs(test, 4)
    cpu = cpu_info()
    m: list[dict] = []  # label, runtime, path, precision, note

    def add(label, runtime, path, precision="f32", note=""):
        m.append({"label": label, "runtime": runtime, "path": path, "precision": precision,
                  "note": note})

    f20 = d / f"{name}-f20.onnx"
    t0 = time.perf_counter()
    export_onnx(lm.module, f20, example, OnnxConfig(opset=20, lint=False))
    add("float, opset 20", "ort", f20, note=f"{time.perf_counter() - t0:.0f} s export")
    if opset23_supported():
        f23 = d / f"{name}-f23.onnx"
        r = export_onnx(lm.module, f23, example, OnnxConfig(opset=23, lint=False))
        add("float, opset 23", "ort", f23, note=f"ops {r.ops}")
    add("float f32", "ov", f20)
    if cpu.bf16:
        add("float bf16", "ov", f20, "bf16")
    s = _try(notes, f"{name} quantize_dynamic", lambda: ort_dynamic(f20, d / f"{name}-dyn.onnx"))
    if s is not None:
        add("ORT quantize_dynamic", "ort", d / f"{name}-dyn.onnx", note=f"{s:.0f} s")
    if opset23_supported():
        s = _try(notes, f"{name} quantize_dynamic opset 23",
                 lambda: ort_dynamic(f23, d / f"{name}-dyn23.onnx"))
        if s is not None:
            add("ORT quantize_dynamic, opset 23 (its defaults)", "ort", d / f"{name}-dyn23.onnx",
                note=f"{s:.0f} s")
    s = _try(notes, f"{name} quantize_static",
             lambda: ort_static(f20, d / f"{name}-static.onnx", calib, n_calib))
    if s is not None:
        add("ORT quantize_static", "ort", d / f"{name}-static.onnx", note=f"{s:.0f} s calib")
    s = _try(notes, f"{name} NNCF", lambda: nncf_quantize(f20, d / f"{name}-nncf.xml", calib,
                                                          n_calib))
    if s is not None:
        add("NNCF quantize INT8", "ov", d / f"{name}-nncf.xml", note=f"{s:.0f} s calib")
        if cpu.bf16:
            add("NNCF quantize INT8, bf16 hint", "ov", d / f"{name}-nncf.xml", "bf16")

    def ours(cfg: QuantConfig):
        t = time.perf_counter()
        q = to_inference(quantize(lm.module, cfg, calib).model)
        return q, time.perf_counter() - t

    def exp(q, tag, ocfg, label, runtime="ort", precision="f32"):
        path = d / f"{name}-{tag}.onnx"
        r = export_onnx(q, path, example, ocfg)
        form = r.form
        note = (f"opset {r.opset}, weights {form['weights']}, acts {form['activations']}, "
                f"ORT int matmuls {r.fusion.get('integer_matmuls')}/float "
                f"{r.fusion.get('float_matmuls')}")
        slow = [w.split(":")[1].strip() for w in r.warnings if w.startswith("slow on")]
        if slow:
            note += f"; slow: {', '.join(slow)}"
        add(label, runtime, path, precision, note)
        return path

    base = dict(method="repq", calib_samples=n_calib, softmax="uniform", embedding_bits=8)
    asym, s1 = ours(QuantConfig(**base))
    sym, s2 = ours(QuantConfig(**base, symmetric=True))
    w7, s3 = ours(QuantConfig(**base, weight_bits=7))
    cli, s4 = ours(QuantConfig())
    cli0, _ = ours(QuantConfig(outlier_channels=0))
    clis, s5 = ours(QuantConfig(symmetric=True))
    clis0, _ = ours(QuantConfig(symmetric=True, outlier_channels=0))
    notes.append(f"{name}: our calibration {s1:.0f}/{s2:.0f}/{s3:.0f}/{s4:.0f}/{s5:.0f} s "
                 "(asym/sym/W7/CLI default/CLI default symmetric)")
    isa = cpu.isa
    lint = dict(lint=False)
    if opset23_supported():
        exp(asym, "ort23", OnnxConfig(target="ort-cpu", opset=23, **lint),
            f"ours W8A8 asym, ort-cpu ({isa}) opset 23")
    exp(asym, "ort20", OnnxConfig(target="ort-cpu", opset=20, **lint),
        f"ours W8A8 asym, ort-cpu ({isa}) opset 20")
    exp(sym, "sym-ort20", OnnxConfig(target="ort-cpu", opset=20, **lint),
        f"ours W8A8 sym, ort-cpu ({isa}) opset 20")
    exp(asym, "avx2", OnnxConfig(target="ort-cpu", isa="avx2", opset=20, **lint),
        "ours W8A8 asym, ort-cpu avx2 form")
    exp(w7, "w7-avx2", OnnxConfig(target="ort-cpu", isa="avx2", opset=20, **lint),
        "ours W7A8 asym, ort-cpu avx2 form")
    exp(asym, "portable", OnnxConfig(target="portable", **lint), "ours W8A8 asym, portable")
    exp(cli, "cli", OnnxConfig(**lint), "ours CLI defaults (QuantConfig(), OnnxConfig())")
    exp(cli0, "cli0", OnnxConfig(**lint), "ours CLI defaults, outlier_channels 0")
    for q, tag, label in ((clis, "clis", "ours CLI defaults symmetric"),
                          (clis0, "clis0", "ours CLI defaults symmetric, outlier_channels 0")):
        p = exp(q, f"{tag}-ov", OnnxConfig(target="openvino", **lint),
                f"{label}, openvino (ONNX read)", "ov")
        if cpu.bf16:
            add(f"{label}, openvino, bf16 hint", "ov", p, "bf16")
    ovp = exp(sym, "ov", OnnxConfig(target="openvino", **lint),
              "ours W8A8 sym, openvino (ONNX read)", "ov")
    t0 = time.perf_counter()
    xml = export_openvino(sym, d / f"{name}-ov-ir.xml", example,
                          OnnxConfig(target="openvino", **lint)).path
    add("ours W8A8 sym, openvino (IR)", "ov", xml,
        note=f"{time.perf_counter() - t0:.0f} s export+convert+parity")
    if cpu.bf16:
        add("ours W8A8 sym, openvino, bf16 hint", "ov", ovp, "bf16")
    exp(asym, "ov-asym", OnnxConfig(target="openvino", **lint),
        "ours W8A8 asym, openvino (ONNX read)", "ov")

    rows = []
    for e in m:
        if e["runtime"] == "ort":
            preds = predict(e["path"], test, threads=THREADS)
        else:
            preds = ov_predict(e["path"], test, threads=THREADS, precision=e["precision"])
        rows.append({**e, "task": name, "accuracy": float((preds == labels).float().mean()),
                     "agreement": float((preds == torch_preds).float().mean())})
    lat_in = {b: batch_inputs(test, b) for b in (1, 32)}
    for b in (1, 32):
        for k in range(rounds):  # alternating, order rotated: load affects every model alike
            for r in rows[k % len(rows):] + rows[:k % len(rows)]:
                if r["runtime"] == "ort":
                    ms = ort_latency(r["path"], lat_in[b], repeats, warmup=3, threads=THREADS)
                else:
                    ms = ov_latency(r["path"], lat_in[b], repeats, warmup=3, threads=THREADS,
                                    precision=r["precision"])
                r.setdefault(f"b{b}", []).append(ms["median_ms"])
    for r in rows:
        for b in (1, 32):
            r[f"b{b}_median"] = statistics.median(r[f"b{b}"])
            r[f"b{b}"] = min(r[f"b{b}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["minilm-vader", "vit-fmnist"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--limit", type=int, default=1000, help="test rows for accuracy/agreement")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    import onnxruntime

    cpu = cpu_info()
    try:
        import openvino

        ov_version = openvino.__version__.split("-")[0]
    except ImportError:
        ov_version = "not installed"
    print(f"date {datetime.date.today()}; CPU {cpu.line()}")
    print(f"all flags: {' '.join(sorted(cpu.flags))}")
    print(f"threads {THREADS}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"openvino {ov_version}; opset 23 supported: {opset23_supported()}")
    notes: list[str] = []
    all_rows = []
    with tempfile.TemporaryDirectory() as d:
        for t in args.tasks:
            all_rows += run_task(t, args.repeats, args.calib, args.limit, Path(d), notes,
                                 args.rounds)
    print(f"\n{args.rounds} alternating rounds; ms: fastest round / median round")
    print("| task | model | runtime | accuracy | agreement w/ FP32 | batch 1 ms | batch 32 ms | "
          "vs ORT float o20 (b32, min / median) | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in all_rows:
        base = next(x for x in all_rows if x["task"] == r["task"] and x["label"] == "float, opset 20")
        rt = "ONNX Runtime" if r["runtime"] == "ort" else f"OpenVINO {r['precision']}"
        print(f"| {r['task']} | {r['label']} | {rt} | {r['accuracy']:.4f} | {r['agreement']:.4f} | "
              f"{r['b1']:.2f} / {r['b1_median']:.2f} | {r['b32']:.1f} / {r['b32_median']:.1f} | "
              f"{base['b32'] / r['b32']:.2f}x / {base['b32_median'] / r['b32_median']:.2f}x | "
              f"{r['note']} |")
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
