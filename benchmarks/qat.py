"""QAT benchmark: post-training quantization vs quantization-aware fine-tuning, same bit-widths.

For each labelled zoo model and bit-width (defaults: minilm-vader W4A4; vit-fmnist W3A3, W4A4,
W2A4, the targets of issue 29) one worker process loads the model, quantizes it (``--method``,
``--calib`` calibration rows, inference form, as the ``quantize`` stage leaves it), fine-tunes
that with :func:`slimformer.qat.api.qat` on ``--rows`` rows of the train split (a quarter held
out for early stopping, as the ``qat`` stage does) and judges float, PTQ and QAT on the same
test rows (``--test`` rows spread evenly over the test split): accuracy and top-1 agreement with
float. Reported per row: the fine-tuning's wall and CPU seconds (judgements of the held-out rows
included; quantization and test evaluation not), CPU-s per step, steps run and kept, why it
stopped, the worker's peak RSS (``wait4``) and total CPU seconds.

Run (one command; ``OMP_NUM_THREADS`` / ``--threads`` set torch's threads)::

    .venv/bin/python benchmarks/qat.py                                   # every default row
    .venv/bin/python benchmarks/qat.py --models vit-fmnist --bits W3A3 --steps 200 --rows 4096
    .venv/bin/python benchmarks/qat.py --models minilm-vader --max-minutes 15 --set held_out=0.1
    .venv/bin/python benchmarks/qat.py --method minmax --ptq-set act_dynamic=token   # run-time ranges

``--set KEY=VALUE`` sets any :class:`~slimformer.qat.config.QatConfig` field.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_BITS = {"minilm-vader": ("W4A4",), "vit-fmnist": ("W3A3", "W4A4", "W2A4")}


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo``), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def spread(ds, n):
    """``n`` rows spread evenly over ``ds`` (text test splits are sorted by length)."""
    import torch

    from slimformer.data.datasets import TensorDictDataset

    if n is None or n >= len(ds):
        return ds
    idx = torch.linspace(0, len(ds) - 1, n).round().long()
    return TensorDictDataset({k: v[idx] for k, v in ds.inputs.items()}, ds.labels[idx])


# ---------------------------------------------------------------- worker


def worker(args) -> dict:
    """Quantize, fine-tune and judge one (model, bits); the row as a dict."""
    import torch

    from slimformer.data.datasets import get_dataset
    from slimformer.models.loading import load_model
    from slimformer.models.spec import ZooSpec
    from slimformer.qat.api import qat
    from slimformer.qat.config import QatConfig
    from slimformer.quantize.api import quantize
    from slimformer.quantize.config import QuantConfig
    from slimformer.quantize.inference import to_inference
    from slimformer.stages.context import evaluate_model

    torch.set_num_threads(args.threads)
    bits = args.worker[1]
    w, a = int(bits[1:bits.index("A")]), int(bits[bits.index("A") + 1:])
    lm = load_model(ZooSpec(name=args.worker[0]))
    test = spread(get_dataset(lm.dataset, "test"), args.test)
    pf, y = evaluate_model(lm.module, test, 250)
    t0 = time.perf_counter()
    ptq = {"method": args.method, "weight_bits": w, "act_bits": a, "calib_samples": args.calib,
           "outlier_channels": 0, **dict(args.ptq_set)}
    qm = quantize(lm.module, QuantConfig(**ptq), get_dataset(lm.dataset, "calib")).model
    qm = to_inference(qm, inplace=True)
    quant_s = time.perf_counter() - t0
    pq, _ = evaluate_model(qm, test, 250)
    cfg = QatConfig(**{"steps": args.steps, "rows": args.rows, **dict(args.set)})
    train = get_dataset(lm.dataset, "train", sample=cfg.rows)

    def progress(desc, step, steps):
        if step % max(1, steps // 10) == 0:
            print(f"  {desc} {step}/{steps} [{time.strftime('%H:%M:%S')}]", file=sys.stderr,
                  flush=True)

    res = qat(qm, lm.module, cfg, train, getattr(lm, "task", None), progress)
    pa, _ = evaluate_model(res.model, test, 250)
    log = res.log

    def score(p):
        return round(float((p == y).float().mean()), 4), round(float((p == pf).float().mean()), 4)

    return {"model": args.worker[0], "bits": bits, "method": args.method, "test_rows": len(test),
            "float_acc": score(pf)[0], "ptq": score(pq), "qat": score(pa),
            "steps": log.steps, "best_step": log.best_step, "stopped": log.stopped,
            "judgements": [(j.step, round(j.metrics[res.metric], 4), round(j.metrics["db"], 2))
                           for j in log.judgements],
            "fit_rows": res.fit_rows, "held_rows": res.held_rows,
            "held_db": [round(log.judgements[0].metrics["db"], 2), round(log.best.metrics["db"], 2)],
            "ft_wall_s": round(log.seconds, 1), "ft_cpu_s": round(log.cpu_seconds, 1),
            "cpu_s_per_step": round(log.cpu_seconds / max(log.steps, 1), 3),
            "softmax": sorted(a.probs.kind for a in qm.quant.attention.values()),
            "quantize_s": round(quant_s, 1), "writeback_db": round(min(res.writeback_db, 999), 1),
            "config": cfg.model_dump(mode="json")}


# ---------------------------------------------------------------- parent


def run_worker(argv: list[str], log: Path) -> tuple[dict | None, float, float]:
    """Run one worker; (its row or None, CPU seconds, peak RSS GB) from ``wait4``."""
    with open(log, "w") as f:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=f, text=True)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        print("   " + "\n   ".join(lines[-3:]), flush=True)
        return None, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e6
    return json.loads(out.strip().splitlines()[-1]), usage.ru_utime + usage.ru_stime, \
        usage.ru_maxrss / 1e6


def table(rows: list[dict]) -> list[str]:
    """The markdown table of the rows."""
    out = ["| model | bits | float acc | PTQ acc / agree | QAT acc / agree | steps (kept, why) | "
           "fine-tune wall s / CPU-s | CPU-s / step | worker CPU-s | peak RSS GB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['bits']} | failed: {r['error']} | | | | | | | |")
            continue
        out.append(f"| {r['model']} | {r['bits']} | {r['float_acc']:.4f} | "
                   f"{r['ptq'][0]:.4f} / {r['ptq'][1]:.4f} | {r['qat'][0]:.4f} / {r['qat'][1]:.4f} | "
                   f"{r['steps']} ({r['best_step']}, {r['stopped']}) | {r['ft_wall_s']:.0f} / "
                   f"{r['ft_cpu_s']:.0f} | {r['cpu_s_per_step']:.3f} | {r['worker_cpu_s']:.0f} | "
                   f"{r['peak_rss_gb']:.2f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(DEFAULT_BITS))
    ap.add_argument("--bits", nargs="*", default=None, help="e.g. W3A3 W4A4 (default per model)")
    ap.add_argument("--method", default="repq", help="the PTQ method QAT starts from")
    ap.add_argument("--calib", type=int, default=128, help="PTQ calibration rows")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rows", type=int, default=4096, help="QAT rows of the train split")
    ap.add_argument("--test", type=int, default=2000, help="test rows (spread over the split)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    type=lambda s: tuple(s.split("=", 1)), help="QatConfig fields")
    ap.add_argument("--ptq-set", nargs="*", default=[], metavar="KEY=VALUE",
                    type=lambda s: tuple(s.split("=", 1)),
                    help="QuantConfig fields of the PTQ start, e.g. act_dynamic=token")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    import torch

    print(f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} "
          f"threads; PTQ {args.method} {dict(args.ptq_set) or ''} ({args.calib} calibration rows, "
          f"inference form); QAT "
          f"{args.steps} steps on {args.rows} train rows, settings {dict(args.set) or 'default'}; "
          f"{args.test} test rows spread over the test split\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            for bits in args.bits or DEFAULT_BITS.get(model, ("W4A4",)):
                print(f"[{time.strftime('%H:%M:%S')}] {model} {bits} ...", flush=True)
                argv = [sys.executable, __file__, "--worker", model, bits, "--method", args.method,
                        "--calib", str(args.calib), "--steps", str(args.steps), "--rows",
                        str(args.rows), "--test", str(args.test), "--threads", str(args.threads),
                        "--set", *[f"{k}={v}" for k, v in args.set],
                        "--ptq-set", *[f"{k}={v}" for k, v in args.ptq_set]]
                row, cpu, rss = run_worker(argv, Path(work) / f"{model}-{bits}.log")
                row = row or {"model": model, "bits": bits, "error": "worker failed (above)"}
                row.update(worker_cpu_s=round(cpu, 1), peak_rss_gb=round(rss, 2))
                rows.append(row)
    print("\n" + "\n".join(table(rows)))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
