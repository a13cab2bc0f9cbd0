"""PTQ benchmark: every method and setting on the zoo tasks, plus the peers a user would try.

Measured in one run on this machine: FP32 metric; for W8A8, W6A6, W4A4 and each method (minmax,
percentile, repq, repquant) the metric of the inference form, its agreement with FP32, the
calibration time and sample count; and at W8A8 torch dynamic int8 and ONNX Runtime
``quantize_static`` (QDQ, per-channel, on the same model exported to ONNX).

Run: ``.venv/bin/python benchmarks/ptq.py`` (all tasks; about an hour on 2 cores), or e.g.
``.venv/bin/python benchmarks/ptq.py --tasks vit-fmnist minilm-vader --limit 1000``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slimformer.data.datasets import get_dataset
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.pipeline import evaluate_model
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference

TASKS = ("vit-fmnist", "minilm-vader", "minilm-trec", "clip-fmnist")
SETTINGS = ((8, 8), (6, 6), (4, 4))
METHODS = ("minmax", "percentile", "repq", "repquant")


def spread(ds, n):
    """``n`` rows spread evenly over ``ds`` (text test splits are sorted by length)."""
    from slimformer.data.datasets import TensorDictDataset

    if n is None or n >= len(ds):
        return ds
    idx = torch.linspace(0, len(ds) - 1, n).round().long()
    return TensorDictDataset({k: v[idx] for k, v in ds.inputs.items()}, ds.labels[idx])


def _row(task, setting, method, acc, agree, secs, n):
    print(f"| {task} | {setting} | {method} | {acc:.4f} | {agree:.4f} | {secs:.1f} | {n} |",
          flush=True)


def torch_dynamic(model, test, p0, y):
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    p, _ = evaluate_model(q, test, 250)
    return float((p == y).float().mean()), float((p == p0).float().mean())


def ort_static(lm, calib, test, p0, y, n_calib, batch=50):
    """ONNX Runtime quantize_static (QDQ, per-channel, S8S8) of the legacy-exported model."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    names = list(lm.input_specs)
    model = lm.module

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *xs):
            from slimformer.models.outputs import require_class_scores

            return require_class_scores(self.m(**dict(zip(names, xs, strict=True))))

    def rows(ds, i, j):
        return [ds.inputs[k][i:j] for k in names]

    def pad(xs):
        return [torch.cat([x, x[:1].expand(batch - len(x), *x.shape[1:])]) if len(x) < batch
                else x for x in xs]

    with tempfile.TemporaryDirectory() as d:
        fp, qp = Path(d) / "fp.onnx", Path(d) / "q.onnx"
        torch.onnx.export(Wrap().eval(), tuple(rows(test, 0, batch)), str(fp), dynamo=False,
                          input_names=names, output_names=["logits"], opset_version=17)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([dict(zip(names, [x.numpy() for x in pad(rows(calib, i, i + batch))],
                                         strict=True))
                                for i in range(0, min(n_calib, len(calib)), batch)])

            def get_next(self):
                return next(self.it, None)

        quantize_static(str(fp), str(qp), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8)
        sess = ort.InferenceSession(str(qp), providers=["CPUExecutionProvider"])
        preds = []
        for i in range(0, len(test), batch):
            xs = rows(test, i, i + batch)
            n = len(xs[0])
            out = sess.run(None, dict(zip(names, [x.numpy() for x in pad(xs)], strict=True)))[0]
            preds.append(torch.from_numpy(np.asarray(out[:n])).argmax(-1))
    p = torch.cat(preds)
    return float((p == y).float().mean()), float((p == p0).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="*", default=list(TASKS))
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--settings", nargs="*", default=[f"W{w}A{a}" for w, a in SETTINGS])
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N test rows")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--recon-steps", type=int, default=200, help="repquant rounding steps")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; calibration "
          f"{args.calib_samples} samples from the train split; eval rows: "
          f"{args.limit or 'all'} (spread evenly over the test split)\n")
    print("| task | setting | method | metric | agreement with FP32 | calib s | calib n |")
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        lm = load_model(ZooSpec(name=task))
        test = spread(get_dataset(lm.dataset, "test"), args.limit)
        calib = get_dataset(lm.dataset, "calib")
        p0, y = evaluate_model(lm.module, test, 250)
        _row(task, "FP32", "-", float((p0 == y).float().mean()), 1.0, 0.0, 0)
        for setting in args.settings:
            w, a = int(setting[1]), int(setting[3])
            for method in args.methods:
                cfg = QuantConfig(method=method, weight_bits=w, act_bits=a,
                                  calib_samples=args.calib_samples, recon_steps=args.recon_steps)
                res = quantize(lm.module, cfg, calib)
                p, _ = evaluate_model(to_inference(res.model), test, 250)
                _row(task, setting, method, float((p == y).float().mean()),
                     float((p == p0).float().mean()), res.seconds, res.calib_samples)
            if setting == "W8A8" and not args.no_peers:
                t0 = time.perf_counter()
                acc, agree = torch_dynamic(lm.module, test, p0, y)
                _row(task, setting, "torch dynamic int8 (peer)", acc, agree,
                     time.perf_counter() - t0, 0)
                t0 = time.perf_counter()
                try:
                    acc, agree = ort_static(lm, calib, test, p0, y, args.calib_samples)
                    _row(task, setting, "ORT quantize_static QDQ per-channel (peer)", acc, agree,
                         time.perf_counter() - t0, args.calib_samples)
                except Exception as exc:  # a peer failing is a result, not a crash
                    print(f"| {task} | {setting} | ORT quantize_static (peer) | failed: "
                          f"{type(exc).__name__}: {str(exc)[:80]} | | | |", flush=True)


if __name__ == "__main__":
    main()
