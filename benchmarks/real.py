"""Real pretrained zoo models: our quantization beside the peers a user would pick, same rows.

For each model of the real zoo (``slimformer zoo install NAME`` first), every configuration runs
in its own subprocess under a wall-clock cap (``--cap`` s; a slow method is reported as timed
out, the others go on) and its peak RSS is read from that child's ``wait4`` resource usage.
Every configuration is judged in the runtime it deploys to (ONNX Runtime or OpenVINO, 2 threads)
against the float PyTorch model, with the metrics of :mod:`slimformer.models.taskeval`:

- ``sentence-embedding`` (minilm-l6, mpnet-base): embedding cosine (mean, min) vs float,
  nearest-neighbour agreement, and a probe fitted on float embeddings of labelled train rows,
  on ``--rows`` held-out test sentences of vader-movie; calibration on ``--calib`` train rows;
- ``causal-lm`` (smollm2-135m): perplexity and next-token agreement over ``--tokens`` tokens of
  nyt-editorials (test split), sliding 1024-token windows.

Rows: float (our ONNX export), ours (``quantize`` then ``export onnx``, ONNX Runtime) at W8A8
with the default method and with minmax, W4A8 minmax; ONNX Runtime ``quantize_dynamic``
(MatMul/Gemm only) and ``quantize_static`` (QDQ, per-channel) of our float export; NNCF
``quantize`` (TRANSFORMER, SmoothQuant) and ``compress_weights`` (INT8, INT4 group 128) in
OpenVINO. Our QuantConfig has no weight-only mode (``act_bits`` is 2..8), so there are no rows of
ours for weight-only INT8/INT4. Latency: every artifact in one process, models alternated round
by round (``--rounds``), median of the rounds' medians of ``--repeats`` runs (a third of them at
batch 32) after one warm-up; encoders at batch 1 and 32 (128 tokens), the LM at batch 1 over 128
tokens (one prefill).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real.py                    # minilm-l6, smollm2
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real.py --models minilm-l6 --quick
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

THREADS = 2
SEQ = 128
ENCODER = ("float", "ours-w8a8-default", "ours-w8a8-minmax", "ours-w4a8-minmax", "ort-dynamic",
           "ort-static", "nncf-quantize", "nncf-w8", "nncf-w4g128")
LM = ("float", "ours-w8a8-minmax", "ours-w8a8-default", "nncf-w8", "nncf-w4g128", "nncf-w4g64",
      "ort-dynamic")
QUICK = {"sentence-embedding": ("float", "ours-w8a8-minmax", "ours-w8a8-default", "ort-dynamic",
                                "ort-static", "nncf-quantize"),
         "causal-lm": ("float", "ours-w8a8-minmax", "nncf-w8", "nncf-w4g128", "nncf-w4g64")}
LABELS = {"float": "float (our ONNX export)", "ours-w8a8-default": "ours W8A8, default method",
          "ours-w8a8-minmax": "ours W8A8 minmax", "ours-w4a8-minmax": "ours W4A8 minmax",
          "ort-dynamic": "ORT quantize_dynamic (MatMul/Gemm)",
          "ort-static": "ORT quantize_static QDQ per-channel",
          "nncf-quantize": "NNCF quantize TRANSFORMER+SmoothQuant", "nncf-w8": "NNCF compress_weights INT8",
          "nncf-w4g128": "NNCF compress_weights INT4 g128",
          "nncf-w4g64": "NNCF compress_weights INT4 g64"}


# ---------------------------------------------------------------- worker side (one configuration)


def _load(name: str):
    from slimformer.models.loading import load_model, parse_model_arg
    from slimformer.models.pretrained.install import model_dir

    folder = model_dir(name)
    lm = load_model(parse_model_arg(name))
    return lm, str(folder)


def _data(task: str, folder: str, args) -> dict:
    import torch

    from slimformer.data.datasets import get_dataset

    if task == "causal-lm":
        from slimformer.models import taskeval as T

        test = get_dataset("nyt-editorials", "test", tokenizer=folder)
        calib = get_dataset("nyt-editorials", "train", tokenizer=folder)
        return {"stream": T.token_stream(test, args.tokens), "calib": calib.select(slice(0, args.lm_calib))}
    test = get_dataset("vader-movie", "test", tokenizer=folder)
    train = get_dataset("vader-movie", "train", tokenizer=folder)
    g = torch.Generator().manual_seed(0)
    idx = torch.linspace(0, len(test) - 1, min(args.rows, len(test))).round().long()
    perm = torch.randperm(len(train), generator=g)
    calib = train.select(perm[:args.calib].sort().values)
    bank = train.select(perm[args.calib:args.calib + 2000].sort().values)  # probe rows, disjoint
    return {"eval": test.select(idx), "calib": calib, "bank": bank}


def _calib_feeds(calib, names, n: int, batch: int) -> list[dict]:
    return [{k: v[i:i + batch].numpy() for k, v in calib.inputs.items() if k in names}
            for i in range(0, min(n, len(calib)), batch)]


class Deployed:
    """An ONNX Runtime session or OpenVINO compiled model called like a Hugging Face model."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".onnx":
            from slimformer.export.ortrun import run_all, session

            self.sess = session(path, THREADS)
            self.names = {i.name for i in self.sess.get_inputs()}
            self._run = lambda x: run_all(self.sess, x)
        else:
            from slimformer.export.openvino import compile_model, run_all

            self.sess = compile_model(str(path), threads=THREADS)
            self.names = {n for i in self.sess.inputs for n in i.get_names()}
            self._run = lambda x: run_all(self.sess, x)

    def __call__(self, **inputs):
        import torch

        if "attention_mask" in self.names and "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        out = self._run({k: v for k, v in inputs.items() if k in self.names})
        vals = list(out.values())
        res = {}
        for k, v in out.items():
            t = torch.from_numpy(v)
            if "logits" in k or (v.ndim == 3 and v.shape[-1] > 10_000):
                res["logits"] = t
            elif v.ndim == 3 and "last_hidden_state" not in res:
                res["last_hidden_state"] = t
        if not res:
            res["last_hidden_state"] = torch.from_numpy(vals[0])
        return res

    def eval(self):
        return self


def _embed(model, ds, batch: int = 32):
    """Sentence embeddings ``(N, H)`` of ``ds`` by ``model`` (torch or deployed), rows padded."""
    import torch

    from slimformer.models import taskeval as T

    embs = []
    with torch.no_grad():
        for i in range(0, len(ds), batch):
            x = {k: v[i:i + batch] for k, v in ds.inputs.items()}
            embs.append(T.sentence_embedding(model(**x), x.get("attention_mask")))
    return torch.cat(embs)


def _export(model, path: Path, example, **kw) -> Path:
    from slimformer.export.config import OnnxConfig
    from slimformer.export.onnx import export_onnx

    export_onnx(model, path, example, OnnxConfig(lint=False, **kw))
    return path


def _float_onnx(work: Path, opset: int | None = None) -> Path:
    p = work / ("float.onnx" if opset is None else f"float-o{opset}.onnx")
    if not p.exists():
        raise FileNotFoundError(f"{p} (the float configuration did not finish)")
    return p


CALIB: dict[str, float] = {}  # seconds of our quantize call alone (the rest of a build: export)


def make_artifact(config: str, lm, data: dict, work: Path, args) -> Path:
    """Build the deployed artifact of ``config`` under ``work``; returns its path."""
    import torch

    ex = {k: v[:2] for k, v in data["calib"].inputs.items() if k in lm.input_specs}
    if config == "float":
        _export(lm.module, work / "float.onnx", ex)
        if lm.task != "causal-lm":
            _export(lm.module, work / "float-o20.onnx", ex, opset=20)
            ref = {"eval": _embed(lm.module, data["eval"]), "bank": _embed(lm.module, data["bank"]),
                   "eval_y": data["eval"].labels, "bank_y": data["bank"].labels}
            torch.save(ref, work / "ref.pt")
        return work / "float.onnx"
    if config.startswith("ours-"):
        from slimformer.quantize.api import quantize
        from slimformer.quantize.config import QuantConfig
        from slimformer.quantize.inference import to_inference

        w, a = int(config[6]), int(config[8])
        kw = {} if config.endswith("default") else {"method": "minmax"}
        n = args.lm_calib if lm.task == "causal-lm" else args.calib
        cfg = QuantConfig(weight_bits=w, act_bits=a, calib_samples=n, **kw)
        t0 = time.perf_counter()
        q = to_inference(quantize(lm.module, cfg, data["calib"]).model)
        CALIB[config] = time.perf_counter() - t0
        return _export(q, work / f"{config}.onnx", ex)
    if config == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = work / f"{config}.onnx"
        quantize_dynamic(str(_float_onnx(work)), str(out), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul", "Gemm"],
                         use_external_data_format=True)
        return out
    if config == "ort-static":
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        from slimformer.export.ortrun import session

        src = _float_onnx(work)
        rows = _calib_feeds(data["calib"], {i.name for i in session(src).get_inputs()},
                            len(data["calib"]), 32)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(rows)

            def get_next(self):
                return next(self.it, None)

        out = work / f"{config}.onnx"
        quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
        return out
    import nncf
    import openvino as ov

    src = work / "float-o20.onnx"
    m = ov.Core().read_model(str(src if src.exists() else _float_onnx(work)))
    out = work / f"{config}.xml"
    if config == "nncf-quantize":
        names = {n for i in m.inputs for n in i.get_names()}
        rows = _calib_feeds(data["calib"], names, len(data["calib"]), 1)
        q = nncf.quantize(m, nncf.Dataset(rows), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(rows))  # SmoothQuant is part of the TRANSFORMER preset
    elif config == "nncf-w8":
        q = nncf.compress_weights(m, mode=nncf.CompressWeightsMode.INT8_ASYM)
    else:  # nncf-w4gN: INT4 asymmetric, groups of N along the input channels, every layer
        q = nncf.compress_weights(m, mode=nncf.CompressWeightsMode.INT4_ASYM,
                                  group_size=int(config.split("g")[-1]), ratio=1.0)
    ov.save_model(q, str(out), compress_to_fp16=False)
    return out


def _size(path: Path) -> int:
    """Bytes of an artifact and its side files (external data, OpenVINO .bin)."""
    stem = path.name.split(".")[0]
    return sum(p.stat().st_size for p in path.parent.iterdir()
               if p.name.split(".")[0] == stem and p.is_file()
               and p.suffix in (".onnx", ".data", ".xml", ".bin"))


def worker(args) -> None:
    import torch

    torch.set_num_threads(THREADS)
    work = Path(args.work)
    lm, folder = _load(args.model)
    data = _data(lm.task, folder, args)
    t0 = time.perf_counter()
    path = make_artifact(args.worker, lm, data, work, args)
    secs = time.perf_counter() - t0
    dep = Deployed(path)
    from slimformer.models import taskeval as T

    res = {"calib_s": secs, "artifact": str(path), "bytes": _size(path)}
    if args.worker in CALIB:
        res["quantize_s"] = CALIB[args.worker]
    if lm.task == "causal-lm":
        m = T.language_model_metrics(dep, data["stream"], min(1024, len(data["stream"])),
                                     reference=lm.module)
        res |= {"perplexity": m["perplexity"], "perplexity_float": m["reference_perplexity"],
                "top1_agreement": m["top1_agreement"], "tokens": m["tokens"]}
    else:
        ref = torch.load(work / "ref.pt")
        got = _embed(dep, data["eval"])
        res |= T.embedding_fidelity(ref["eval"], got)
        acc = T.probe_accuracy(ref["bank"], ref["bank_y"], {"m": got, "f": ref["eval"]}, ref["eval_y"])
        res |= {"probe_accuracy": acc["m"], "probe_accuracy_float": acc["f"], "rows": len(got)}
    (work / f"{args.worker}.json").write_text(json.dumps(res))


# ---------------------------------------------------------------- latency (all artifacts, one process)


def latency_worker(args) -> None:
    import statistics

    import torch

    from slimformer.data.datasets import get_dataset
    from slimformer.export.ortrun import time_session

    torch.set_num_threads(THREADS)
    work = Path(args.work)
    arts = json.loads((work / "latency-in.json").read_text())
    lm, folder = _load(args.model)
    batches = (1,) if lm.task == "causal-lm" else (1, 32)
    ds = get_dataset("nyt-editorials" if lm.task == "causal-lm" else "vader-movie", "test",
                     tokenizer=folder)
    out: dict = {}
    for b in batches:
        x = {}
        for k, v in ds.inputs.items():
            pad = torch.zeros(b, SEQ, dtype=v.dtype)
            n = min(SEQ, v.shape[1])
            pad[:, :n] = v[:b, :n]
            if k == "attention_mask" and lm.task == "causal-lm":
                pad[:] = 1
            x[k] = pad
        deps = {c: Deployed(Path(p)) for c, p in arts.items()}
        times: dict = {c: [] for c in deps}
        reps = args.repeats if b == 1 else max(3, args.repeats // 3)
        for _ in range(args.rounds):  # alternate the models round by round: load hits all alike
            for c, d in deps.items():
                if Path(d.path).suffix == ".onnx":
                    times[c].append(time_session(d.sess, x, reps, 1)["median_ms"])
                else:
                    from slimformer.export.openvino import time_compiled

                    times[c].append(time_compiled(d.sess, x, reps, 1)["median_ms"])
        for c, ts in times.items():
            out.setdefault(c, {})[f"b{b}"] = statistics.median(ts)
        del deps
    (work / "latency.json").write_text(json.dumps(out))


# ---------------------------------------------------------------- parent


def run_capped(argv: list[str], cap: float) -> tuple[int | None, float, float]:
    """Run ``argv``; returns (exit code or None when killed at ``cap``, seconds, peak RSS MiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = t0 + cap
    killed = False
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline and not killed:
            os.killpg(p.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.5)
    log = p.stdout.read() if p.stdout else ""
    p.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    if p.returncode != 0 and not killed:
        tail = [ln for ln in log.strip().splitlines() if ln.strip()][-3:]
        print("   " + "\n   ".join(tail), flush=True)
        FAILURES[argv[-1]] = next((ln.strip() for ln in reversed(log.splitlines())
                                   if "Error" in ln), "")[:160]
    return (None if killed else p.returncode), secs, usage.ru_maxrss / 1024


FAILURES: dict[str, str] = {}  # config: the last error line of its worker


def bench_model(name: str, args, work: Path) -> list[dict]:
    from slimformer.models.pretrained.catalog import get_pretrained

    task = get_pretrained(name).task
    configs = args.configs or (QUICK[task] if args.quick else (LM if task == "causal-lm" else ENCODER))
    rows = []
    me = [sys.executable, __file__, "--model", name, "--work", str(work), "--rows", str(args.rows),
          "--calib", str(args.calib), "--lm-calib", str(args.lm_calib), "--tokens", str(args.tokens)]
    for c in configs:
        cap = args.cap if c != "float" else max(args.cap, 900)
        saved = work / f"{c}.row.json"
        if args.resume and saved.exists():
            rows.append(json.loads(saved.read_text()))
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} {c} ...", flush=True)
        rc, secs, rss = run_capped([*me, "--worker", c], cap)
        row = {"model": name, "task": task, "config": c, "wall_s": secs, "rss_mib": rss}
        if rc is None:
            row["status"] = f"timed out after {cap:.0f} s"
        elif rc != 0 or not (work / f"{c}.json").exists():
            row["status"] = f"failed (exit {rc}): {FAILURES.get(c, '')}"
        else:
            row |= json.loads((work / f"{c}.json").read_text())
            row["status"] = "ok"
        print(f"   {row['status']}, {secs:.0f} s, peak RSS {rss:.0f} MiB", flush=True)
        saved.write_text(json.dumps(row))
        rows.append(row)
    ok = {r["config"]: r["artifact"] for r in rows if r["status"] == "ok"}
    if ok and not args.no_latency:
        (work / "latency-in.json").write_text(json.dumps(ok))
        print(f"[{time.strftime('%H:%M:%S')}] {name} latency ...", flush=True)
        rc, secs, _ = run_capped([*me, "--latency", "--rounds", str(args.rounds), "--repeats",
                                  str(args.repeats)], args.cap)
        if rc == 0:
            lat = json.loads((work / "latency.json").read_text())
            for r in rows:
                r |= lat.get(r["config"], {})
        else:
            print(f"   latency {'timed out' if rc is None else 'failed'} ({secs:.0f} s)")
    return rows


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    """The Markdown table of every row (metrics of the row's task, blank where not measured)."""
    head = ("| model | configuration | status | emb. cosine mean / min | NN agree | probe acc "
            "(float) | perplexity (float) | next-token agree | build s (quantize s) | peak RSS MiB | "
            "artifact MB | b=1 ms | b=32 ms |")
    out = [head, "|" + "---|" * 13]
    for r in rows:
        g = r.get
        cos = f"{g('cosine_mean'):.4f} / {g('cosine_min'):.4f}" if g("cosine_mean") else "-"
        probe = (f"{g('probe_accuracy'):.4f} ({g('probe_accuracy_float'):.4f})"
                 if g("probe_accuracy") is not None else "-")
        qs = "" if g("quantize_s") is None else f" ({g('quantize_s'):.0f})"
        ppl = (f"{g('perplexity'):.3f} ({g('perplexity_float'):.3f})" if g("perplexity") else "-")
        out.append(f"| {r['model']} | {LABELS[r['config']]} | {r['status']} | {cos} | "
                   f"{_f(g('neighbour_agreement'), '.4f')} | {probe} | {ppl} | "
                   f"{_f(g('top1_agreement'), '.4f')} | {_f(g('calib_s'), '.0f')}{qs} | "
                   f"{r['rss_mib']:.0f} | {_f(g('bytes') and g('bytes') / 1e6, '.1f')} | "
                   f"{_f(g('b1'), '.2f')} | {_f(g('b32'), '.1f')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    ap.add_argument("--configs", nargs="*", default=None, help=f"subset of {', '.join(ENCODER)}")
    ap.add_argument("--rows", type=int, default=512, help="held-out sentences (encoders)")
    ap.add_argument("--calib", type=int, default=128, help="calibration rows")
    ap.add_argument("--tokens", type=int, default=4096, help="perplexity tokens (LMs)")
    ap.add_argument("--cap", type=float, default=600, help="seconds per configuration")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="the main rows only")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    ap.add_argument("--lm-calib", type=int, default=32, help="calibration rows (LMs)")
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
    try:
        import nncf
        import openvino

        peers = f"openvino {openvino.__version__.split('-')[0]}, nncf {nncf.__version__}"
    except ImportError:
        peers = "openvino/nncf not installed"
    header = (f"date {datetime.date.today()}; CPU {cpu.line()}; {THREADS} threads; torch "
              f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, {peers}; rows "
              f"{args.rows}, calibration {args.calib}, LM tokens {args.tokens}, cap {args.cap:.0f} s")
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
