"""Real pretrained zoo models: our quantization beside the peers a user would pick, same rows.

For each model of the real zoo (``slimformer zoo install NAME`` first), every configuration runs
in its own subprocess under a wall-clock cap (``--cap`` s; a slow method is reported as timed
out, the others go on); its peak RSS and CPU seconds are read from that child's ``wait4``
resource usage. Every configuration is judged in the runtime it deploys to (ONNX Runtime or
OpenVINO, 2 threads) against the float PyTorch model, on held-out rows, with the metrics of
:mod:`slimformer.models.taskeval` (rows and metrics per task: :mod:`real_eval`):
sentence encoders (minilm-l6, mpnet-base): embedding cosine, nearest-neighbour agreement, probe;
vision backbones (dinov2-small): feature cosine, neighbour agreement, 5-NN accuracy; causal LMs
(smollm2-135m): perplexity, next-token agreement.

Rows (:mod:`real_build`): float (our ONNX export); ours (``quantize`` then ``export onnx``, ONNX
Runtime) at W8A8 and W4A8 with the product's defaults and as the plain min/max baseline (no
migration, no outlier channels, attention quantized), and at W8A8 with method repq (a status "N
act. float" counts the activations our output-floor fallback kept float); ours weight-only (INT8 per
channel round to nearest, INT4 groups of 128 with GPTQ, and with GPTQ+AWQ) exported by our ONNX
export as MatMulNBits from our codes and run in ONNX Runtime (where the export refuses: judged in
PyTorch, size of the ``save_quantized`` folder, no latency, the refusal in the status); ONNX
Runtime ``quantize_dynamic`` (MatMul/Gemm only) and ``quantize_static`` (QDQ, per-channel,
MinMax) of our float export; NNCF ``quantize`` (TRANSFORMER preset, SmoothQuant) and
``compress_weights`` (INT8, INT4 per group) in OpenVINO; Brevitas's post-training flow
(:mod:`real_brevitas`: SmoothQuant-style equalization, W8A8, optionally GPTQ), judged in PyTorch
when its ONNX export is unavailable. Encoders run in length-sorted batches cut to their longest
row (:func:`real_eval.embed`). Latency: every ONNX / OpenVINO artifact in one process, alternated
round by round (``--rounds``), median of the rounds' medians of ``--repeats`` runs (a third of
them at the larger batch) after one warm-up; encoders at batch 1 and 32 (128 tokens), DINOv2 at
batch 1 and 8 (224x224), the LM at batch 1 over 128 tokens (one prefill); the table gives
speed-ups over float.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real.py                    # minilm-l6, smollm2
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real.py --models mpnet-base dinov2-small --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).parent))  # real_build, real_eval, real_brevitas

THREADS = 2
WEIGHT_ONLY = ("ours-w8-rtn", "ours-w4g128-gptq", "ours-w4g128-gptq-awq")
OURS_W8A8 = ("ours-w8a8-default", "ours-w8a8-token", "ours-w8a8-repq", "ours-w8a8-minmax",
             "ours-w8a8-rot", "ours-w8a8-rottoken", "ours-w4a8-default", "ours-w4a8-minmax")
ENCODER = ("float", *OURS_W8A8, *WEIGHT_ONLY, "ort-dynamic", "ort-static", "nncf-quantize",
           "nncf-w8", "nncf-w4g128", "brevitas-w8a8", "brevitas-w8a8-gptq")
LM = ("float", *OURS_W8A8, *WEIGHT_ONLY, "nncf-w8", "nncf-w4g128", "nncf-w4g64", "nncf-quantize",
      "ort-dynamic", "ort-static", "brevitas-w8a8")
CONFIGS = {"sentence-embedding": ENCODER, "image-features": ENCODER, "causal-lm": LM}
QUICK = {"sentence-embedding": ("float", "ours-w8a8-default", "ours-w8a8-minmax", "ort-dynamic",
                                "ort-static", "nncf-quantize", "nncf-w8", "nncf-w4g128",
                                "brevitas-w8a8"),
         "image-features": ("float", "ours-w8a8-default", "ort-dynamic", "ort-static",
                            "nncf-quantize", "nncf-w8", "nncf-w4g128", "brevitas-w8a8"),
         "causal-lm": ("float", "ours-w8a8-default", "ours-w4g128-gptq", "nncf-w8",
                       "nncf-w4g128", "nncf-quantize")}
LAT_BATCHES = {"sentence-embedding": (1, 32), "image-features": (1, 8), "causal-lm": (1,)}
LABELS = {"float": "float (our ONNX export)", "ours-w8a8-default": "ours W8A8, defaults",
          "ours-w8a8-minmax": "ours W8A8 plain minmax",
          "ours-w8a8-repq": "ours W8A8 repq",
          "ours-w8a8-token": "ours W8A8, defaults, per-token run-time ranges",
          "ours-w8a8-rot": "ours W8A8, defaults, inputs rotated online (rotate_inputs)",
          "ours-w8a8-rottoken": "ours W8A8, per-token ranges, inputs rotated online",
          "ours-w8a8-minmax-unchecked": "ours W8A8 minmax, SQNR floor off",
          "ours-w4a8-minmax": "ours W4A8 plain minmax", "ours-w4a8-default": "ours W4A8, defaults",
          "ours-w8-rtn": "ours INT8 weight-only per channel (RTN)",
          "ours-w4g128-gptq": "ours INT4 weight-only g128 GPTQ",
          "ours-w4g64-gptq": "ours INT4 weight-only g64 GPTQ",
          "ours-w4g128-gptq-awq": "ours INT4 weight-only g128 GPTQ+AWQ",
          "ort-dynamic": "ORT quantize_dynamic (MatMul/Gemm)",
          "ort-static": "ORT quantize_static QDQ per-channel",
          "nncf-quantize": "NNCF quantize TRANSFORMER+SmoothQuant", "nncf-w8": "NNCF compress_weights INT8",
          "nncf-w4g128": "NNCF compress_weights INT4 g128",
          "nncf-w4g64": "NNCF compress_weights INT4 g64",
          "brevitas-w8a8": "Brevitas PTQ W8A8 (SmoothQuant eq.)",
          "brevitas-w8a8-gptq": "Brevitas PTQ W8A8 (SmoothQuant eq. + GPTQ)"}


# ---------------------------------------------------------------- worker side (one configuration)


def worker(args) -> None:
    import real_build as B
    import real_eval as E
    import torch

    torch.set_num_threads(THREADS)
    work = Path(args.work)
    lm, folder = E.load(args.model)
    data = E.rows(lm.task, folder, args)
    t0, c0 = time.perf_counter(), time.process_time()
    art = B.make_artifact(args.worker, lm, data, work, args)
    res = {"calib_s": time.perf_counter() - t0, "calib_cpu_s": time.process_time() - c0}
    if args.worker in B.CALIB:
        res["quantize_s"] = B.CALIB[args.worker]
    res |= B.NOTES.get(args.worker, {})
    if isinstance(art, Path):
        res |= {"artifact": str(art), "bytes": B.size(art)}
        model = E.Deployed(art)
    else:  # a torch model (Brevitas without its ONNX export, ours where export refused): PyTorch
        res["runtime"] = "PyTorch (fake-quant)"
        if args.worker in B.EXPORT_REFUSED:
            res["export_refused"] = B.EXPORT_REFUSED[args.worker]
        if args.worker in B.SAVED:  # our weight-only folder: packed codes + float rest
            res["bytes"] = sum(f.stat().st_size for f in B.SAVED[args.worker].iterdir())
        model = art
    res |= E.metrics(model, lm, data, work)
    (work / f"{args.worker}.json").write_text(json.dumps(res))


# ---------------------------------------------------------------- latency (all artifacts, one process)


def latency_worker(args) -> None:
    import statistics

    import real_eval as E
    import torch

    from slimformer.export.openvino import time_compiled
    from slimformer.export.ortrun import time_session

    torch.set_num_threads(THREADS)
    work = Path(args.work)
    arts = json.loads((work / "latency-in.json").read_text())
    lm, folder = E.load(args.model)
    out: dict = {}
    for b in LAT_BATCHES[lm.task]:
        x = E.latency_input(lm.task, folder, b)
        deps = {c: E.Deployed(Path(p)) for c, p in arts.items()}
        times: dict = {c: [] for c in deps}
        reps = args.repeats if b == 1 else max(3, args.repeats // 3)
        for _ in range(args.rounds):  # alternate the artifacts round by round: load hits all alike
            for c, d in deps.items():
                if Path(d.path).suffix == ".onnx":
                    times[c].append(time_session(d.sess, x, reps, 1)["median_ms"])
                else:
                    times[c].append(time_compiled(d.sess, x, reps, 1)["median_ms"])
        for c, ts in times.items():
            out.setdefault(c, {})[f"b{b}"] = statistics.median(ts)
        del deps
    (work / "latency.json").write_text(json.dumps(out))


# ---------------------------------------------------------------- parent


def run_capped(argv: list[str], cap: float, log: Path) -> tuple[int | None, float, float, float]:
    """Run ``argv`` (output to ``log``); (exit code or None when killed at ``cap``, wall s, CPU s,
    peak RSS MiB)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(argv, start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
        killed = False
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > t0 + cap and not killed:
                os.killpg(p.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.5)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and not killed:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        print("   " + "\n   ".join(lines[-3:]), flush=True)
        FAILURES[argv[-1]] = next((ln for ln in reversed(lines) if "Error" in ln), "")[:200]
    return ((None if killed else code), time.perf_counter() - t0,
            usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


FAILURES: dict[str, str] = {}  # config: the last error line of its worker


def bench_model(name: str, args, work: Path) -> list[dict]:
    from slimformer.models.pretrained.catalog import get_pretrained

    task = get_pretrained(name).task
    configs = args.configs or (QUICK if args.quick else CONFIGS)[task]
    rows = []
    me = [sys.executable, __file__, "--model", name, "--work", str(work), "--rows", str(args.rows),
          "--calib", str(args.calib), "--lm-calib", str(args.lm_calib), "--tokens", str(args.tokens),
          "--images", str(args.images), "--bank", str(args.bank)]
    for c in configs:
        cap = args.cap if c != "float" else max(args.cap, 900)
        saved = work / f"{c}.row.json"
        if args.resume and saved.exists():
            rows.append(json.loads(saved.read_text()))
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} {c} ...", flush=True)
        rc, secs, cpu, rss = run_capped([*me, "--worker", c], cap, work / f"{c}.log")
        row = {"model": name, "task": task, "config": c, "wall_s": secs, "cpu_s": cpu, "rss_mib": rss}
        if rc is None:
            row["status"] = f"timed out after {cap:.0f} s"
        elif rc != 0 or not (work / f"{c}.json").exists():
            row["status"] = f"failed (exit {rc}): {FAILURES.get(c, '')}"
        else:
            row |= json.loads((work / f"{c}.json").read_text())
            row["status"] = "ok"
        print(f"   {row['status']}, {secs:.0f} s, {cpu:.0f} CPU-s, peak RSS {rss:.0f} MiB", flush=True)
        saved.write_text(json.dumps(row))
        rows.append(row)
    ok = {r["config"]: r["artifact"] for r in rows if r["status"] == "ok" and r.get("artifact")}
    if ok and not args.no_latency:
        (work / "latency-in.json").write_text(json.dumps(ok))
        print(f"[{time.strftime('%H:%M:%S')}] {name} latency ...", flush=True)
        rc, secs, _, _ = run_capped([*me, "--latency", "--rounds", str(args.rounds), "--repeats",
                                     str(args.repeats)], args.cap, work / "latency.log")
        if rc == 0:
            lat = json.loads((work / "latency.json").read_text())
            for r in rows:
                r |= lat.get(r["config"], {})
        else:
            print(f"   latency {'timed out' if rc is None else 'failed'} ({secs:.0f} s)")
    elif args.resume and (work / "latency.json").exists():  # the latency of an earlier run
        lat = json.loads((work / "latency.json").read_text())
        for r in rows:
            r |= lat.get(r["config"], {})
    return rows


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    """The Markdown table of every row (the task's metrics; "-" where not measured).

    Latency is a speed-up over the float export of the same model in the same rounds.
    """
    head = ("| model | configuration | status | cosine mean / min | NN agree | probe / 5-NN acc "
            "(float) | perplexity (float) | next-token agree | build s (quantizer s) | build CPU-s | "
            "peak RSS MiB | artifact MB | speed-up b=1 | speed-up b=32 (DINOv2 b=8) |")
    out = [head, "|" + "---|" * 14]
    base = {(r["model"], b): r.get(b) for r in rows if r["config"] == "float" for b in ("b1", "b32", "b8")}
    for r in rows:
        g = r.get
        cos = f"{g('cosine_mean'):.4f} / {g('cosine_min'):.4f}" if g("cosine_mean") else "-"
        acc = ("probe_accuracy", "probe_accuracy_float") if g("probe_accuracy") is not None else \
            ("knn_accuracy", "knn_accuracy_float")
        accs = f"{g(acc[0]):.4f} ({g(acc[1]):.4f})" if g(acc[0]) is not None else "-"
        qs = "" if g("quantize_s") is None else f" ({g('quantize_s'):.0f})"
        ppl = (f"{g('perplexity'):.3f} ({g('perplexity_float'):.3f})" if g("perplexity") else "-")
        sp = []
        for b in ("b1", "b32" if g("b32") is not None else "b8"):
            f0 = base.get((r["model"], b))
            sp.append(f"{f0 / g(b):.2f}x" if f0 and g(b) else "-")
        where = f" ({g('runtime')})" if g("runtime") else ""
        status = r["status"] if len(r["status"]) < 120 else r["status"][:117] + "..."
        if g("float_activations"):  # our output-floor fallback kept these activations float
            status += f" ({g('float_activations')} act. float)"
        if g("gemm_float"):  # Linears on (B, K) rows: ONNX Gemm, no MatMulNBits form in our export
            status += f" ({len(g('gemm_float'))} Linear on 2-D rows kept float: Gemm)"
        if g("export_refused"):
            status += f"; ONNX export refused: {g('export_refused')[:100]}"
        out.append(f"| {r['model']} | {LABELS[r['config']]}{where} | {status} | {cos} | "
                   f"{_f(g('neighbour_agreement'), '.4f')} | {accs} | {ppl} | "
                   f"{_f(g('top1_agreement'), '.4f')} | {_f(g('calib_s'), '.0f')}{qs} | "
                   f"{_f(g('calib_cpu_s'), '.0f')} | {r['rss_mib']:.0f} | "
                   f"{_f(g('bytes') and g('bytes') / 1e6, '.1f')} | {sp[0]} | {sp[1]} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    ap.add_argument("--configs", nargs="*", default=None, help=f"subset of {', '.join(LABELS)}")
    ap.add_argument("--rows", type=int, default=512, help="held-out sentences (encoders)")
    ap.add_argument("--images", type=int, default=250, help="held-out test images (vision)")
    ap.add_argument("--bank", type=int, default=2000, help="probe / k-NN bank rows (train split)")
    ap.add_argument("--calib", type=int, default=128, help="calibration rows (encoders, vision)")
    ap.add_argument("--tokens", type=int, default=4096, help="perplexity tokens (LMs)")
    ap.add_argument("--cap", type=float, default=600, help="seconds per configuration")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="the main rows only")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    ap.add_argument("--lm-calib", type=int, default=128,
                    help="calibration rows (LMs; 128 as the CLI: GPTQ needs them)")
    ap.add_argument("--work", default=None, help="artifact folder (default: a temporary one)")
    ap.add_argument("--resume", action="store_true", help="reuse finished rows found in --work")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.latency:
        return latency_worker(args)
    import onnxruntime
    import torch

    from slimformer.export.targets import cpu_info

    cpu = cpu_info()
    peers = []
    for mod in ("openvino", "nncf", "brevitas"):
        try:
            from importlib.metadata import version

            peers.append(f"{mod} {version(mod).split('-')[0]}")
        except Exception:  # noqa: BLE001 - not installed
            peers.append(f"{mod} not installed")
    header = (f"date {datetime.date.today()}; CPU {cpu.line()}; {THREADS} threads; torch "
              f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, {', '.join(peers)}; "
              f"rows {args.rows}, images {args.images}, bank {args.bank}, calibration {args.calib} (LM "
              f"{args.lm_calib}), LM tokens {args.tokens}, cap {args.cap:.0f} s")
    print(header)
    print(f"all flags: {' '.join(sorted(cpu.flags))}", flush=True)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as d:
            work = Path(args.work) / name if args.work else Path(d)
            work.mkdir(parents=True, exist_ok=True)
            rows += bench_model(name, args, work)
            print(table(rows), flush=True)
    md = f"{header}\n\n{table(rows)}\n"
    print("\n" + md)
    if args.out:
        Path(args.out).write_text(md)


if __name__ == "__main__":
    main()
