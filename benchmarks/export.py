"""ONNX Runtime CPU latency, size and accuracy: float ONNX vs our W8A8 QDQ vs ORT's quantize_static.

For each task, in one run on this machine: the float model exported by ``export_onnx``; ours,
W8A8 repq calibrated on the task's calibration split, exported as QDQ (uniform 8-bit softmax
probabilities, 8-bit embedding tables; the same with 7-bit weights, stored as int8 within [-64, 63]
so that ONNX Runtime's u8 x s8 kernels are exact; and the log-sqrt2 softmax variant); and ONNX
Runtime's own
``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations as ONNX Runtime recommends
on x86, MinMax calibration on the same rows) applied to the same float ONNX file. Latency is the
median of ``--repeats`` runs after warm-up at batch 1 and 32 (sequence 128 for text: real
sentences padded to 128 tokens); accuracy is ONNX Runtime's on the whole test split.

    .venv/bin/python benchmarks/export.py                       # vit-fmnist and minilm-vader
    .venv/bin/python benchmarks/export.py --tasks minilm-trec --repeats 30
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from slimformer.data.datasets import get_dataset
from slimformer.export.config import OnnxConfig
from slimformer.export.onnx import export_onnx
from slimformer.export.ortrun import ort_latency, predict
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.pipeline import check_fit, evaluate_model, latency_inputs
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference

SEQ = 128


def batch_inputs(ds, batch: int) -> dict[str, torch.Tensor]:
    """``batch`` real rows; integer (token) inputs padded to ``SEQ`` with a zero mask."""
    x = latency_inputs(ds, batch)
    out = {}
    for k, v in x.items():
        if not v.is_floating_point() and v.dim() == 2:
            pad = torch.zeros(v.shape[0], SEQ, dtype=v.dtype)
            n = min(SEQ, v.shape[1])
            pad[:, :n] = v[:, :n]
            v = pad
        out[k] = v
    return out


def ort_static(float_path: Path, out: Path, calib, n_calib: int, batch: int = 32) -> None:
    """ONNX Runtime ``quantize_static``: QDQ, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from slimformer.export.ortrun import feeds, session

    names = {i.name for i in session(float_path, 1).get_inputs()}

    class Reader(CalibrationDataReader):
        def __init__(self):
            rows = [{k: v[i:i + batch] for k, v in calib.inputs.items()}
                    for i in range(0, min(n_calib, len(calib)), batch)]
            self.it = iter([{k: v.numpy() for k, v in r.items() if k in names} for r in rows])

        def get_next(self):
            return next(self.it, None)

    del feeds
    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)


def run_task(name: str, repeats: int, n_calib: int, d: Path) -> list[dict]:
    lm = load_model(ZooSpec(name=name))
    calib, test = get_dataset(lm.dataset, "calib"), get_dataset(lm.dataset, "test")
    check_fit(lm, calib)
    check_fit(lm, test)
    torch_preds, labels = evaluate_model(lm.module, test)
    example = latency_inputs(test, 4)
    models: dict[str, tuple[Path, str]] = {}
    t0 = time.perf_counter()
    export_onnx(lm.module, d / f"{name}-fp32.onnx", example, OnnxConfig(lint=False))
    models["float (FP32)"] = (d / f"{name}-fp32.onnx", f"{time.perf_counter() - t0:.0f} s export")
    variants = (("ours W8A8 QDQ", "uniform", 8), ("ours W7A8 QDQ (int8 weights)", "uniform", 7),
                ("ours W8A8 QDQ, log-sqrt2 softmax", "auto", 8))
    for label, softmax, wbits in variants:
        t0 = time.perf_counter()
        cfg = QuantConfig(method="repq", calib_samples=n_calib, softmax=softmax, embedding_bits=8,
                          weight_bits=wbits)
        inf = to_inference(quantize(lm.module, cfg, calib).model)
        path = d / f"{name}-{softmax}-w{wbits}.onnx"
        res = export_onnx(inf, path, example, OnnxConfig(lint=False))
        models[label] = (path, f"{time.perf_counter() - t0:.0f} s calib+export, ORT integer "
                               f"matmuls {res.fusion['integer_matmuls']}")
    t0 = time.perf_counter()
    ort_static(d / f"{name}-fp32.onnx", d / f"{name}-ortq.onnx", calib, n_calib)
    models["ONNX Runtime quantize_static"] = (d / f"{name}-ortq.onnx",
                                             f"{time.perf_counter() - t0:.0f} s calib")
    rows = []
    lat_in = {b: batch_inputs(test, b) for b in (1, 32)}
    for label, (path, note) in models.items():
        preds = predict(path, test)
        rows.append({"task": name, "model": label, "accuracy": float((preds == labels).float().mean()),
                     "agreement": float((preds == torch_preds).float().mean()),
                     "bytes": path.stat().st_size, "note": note, "path": path})
    # latency last, all models interleaved so that machine load affects them alike
    for b in (1, 32):
        for _ in range(2):
            for r in rows:
                ms = ort_latency(r["path"], lat_in[b], repeats=repeats // 2, warmup=3)["median_ms"]
                r.setdefault(f"b{b}", []).append(ms)
    for r in rows:
        for b in (1, 32):
            r[f"b{b}"] = sorted(r[f"b{b}"])[0]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["vit-fmnist", "minilm-vader"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--calib", type=int, default=128)
    args = ap.parse_args()
    print(f"threads: ONNX Runtime intra-op 2; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        all_rows = []
        for t in args.tasks:
            all_rows += run_task(t, args.repeats, args.calib, Path(d))
        print("\n| task | model | accuracy | agreement w/ FP32 | batch 1 ms | batch 32 ms | "
              "speed-up b32 | size MB | size ratio | note |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in all_rows:
            base = next(x for x in all_rows if x["task"] == r["task"] and
                        x["model"] == "float (FP32)")
            print(f"| {r['task']} | {r['model']} | {r['accuracy']:.4f} | {r['agreement']:.4f} | "
                  f"{r['b1']:.1f} | {r['b32']:.1f} | {base['b32'] / r['b32']:.2f}x | "
                  f"{r['bytes'] / 1e6:.2f} | {r['bytes'] / base['bytes']:.2f} | {r['note']} |")


if __name__ == "__main__":
    main()
