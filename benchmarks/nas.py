"""NAS benchmark: our search (SimQ-NAS / InstaTune) against random search and the INT8 full model.

Per task, in one run: fine-tune the super-network, measure the INT8 full model (the original
weights, uniformly W8A8 with the same method, embedding tables at 8 bits) and ``--samples``
sub-networks (anchors first: the full model at each uniform weight bit-width and the smallest
sub-network; then random draws),
fit the predictors, run NSGA-II on them and measure ``--front`` predicted-front sub-networks.
Random search gets the same budget: our random draws plus as many more random ones as we spent
on anchors and the predicted front. Both fronts are compared by hypervolume (losses
1 - accuracy and cost / full float model cost). The zoo models were trained on the whole train
split, so accuracy is measured on half of the test split (seeded; vit-fmnist: 2,000 of its
rows) and the chosen sub-network, the INT8 full model and FP32 are then evaluated on the other
half. Latency: ONNX Runtime, the quantized (sliced) model exported by ``export_onnx`` in QDQ
form (the float model where that export fails, counted in ``latency_float_fallbacks``), median
of repeats (batch 16 for vit-fmnist, 1 for MiniLM); the INT8 full model is also measured with
float embedding tables (labelled as such) and the float model with ONNX Runtime's
``quantize_dynamic`` (int8 weights) as a latency peer. Quantized sub-networks use the uniform
8-bit softmax (``--softmax``; the fast form in ONNX Runtime on CPUs), the reference too.

Run: ``.venv/bin/python benchmarks/nas.py`` (both tasks, ~40 min on 2 shared cores), or e.g.
``.venv/bin/python benchmarks/nas.py --tasks vit-fmnist --samples 20 --train-steps 100``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slimformer.data.datasets import get_dataset, make_loader
from slimformer.models.evaluate import predict
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.nas.api import _prepare, _subset, reference_subnet, search, split_holdout
from slimformer.nas.config import SearchConfig
from slimformer.nas.measure import measure
from slimformer.nas.pareto import hypervolume, pareto_front, plot_front

TASKS = {  # task -> (val rows, eval rows, fine-tuning lr, batch, steps, latency batch, space)
    "vit-fmnist": (5000, 2000, 1e-4, 64, 150, 16, {"heads": [0.5, 0.75, 1.0], "mlp": [0.25, 0.5, 0.75, 1.0],
                                          "min_blocks": 3, "weight_bits": [4, 6, 8]}),
    "minilm-trec": (500, 500, 5e-5, 16, 40, 1, {"heads": [0.5, 0.75, 1.0], "mlp": [0.25, 0.5, 0.75, 1.0],
                                         "min_blocks": 3, "weight_bits": [4, 6, 8],
                                         "embedding_bits": [4, 8, "float"]}),
}


def accuracy(model, ds) -> float:
    p, y = predict(model, make_loader(ds, 250))
    return float((p == y).float().mean())


def ort_dynamic_latency(model, inputs, repeats) -> float:
    """ONNX Runtime ``quantize_dynamic`` (int8 weights) of the float export: median ms."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from slimformer.export.config import OnnxConfig
    from slimformer.export.onnx import export_onnx
    from slimformer.export.parity import latency

    with tempfile.TemporaryDirectory() as d:
        export_onnx(model, f"{d}/f.onnx", inputs, OnnxConfig(check=False, lint=False))
        quantize_dynamic(f"{d}/f.onnx", f"{d}/q.onnx", weight_type=QuantType.QInt8,
                         per_channel=True)
        return latency(f"{d}/q.onnx", inputs, repeats, warmup=3,
                       threads=torch.get_num_threads())["median_ms"]


def recheck_points(points: dict, evald, calib, cfg, lat_in, test, repeats: int,
                   rounds: int = 3) -> dict:
    """Test-split accuracy and back-to-back QDQ latency of a few measured points.

    ``points``: label -> (super-network, sub-network). Each is quantized as in the search and
    exported once; the ONNX Runtime sessions are then timed in turn, ``rounds`` times, so all
    points see the same machine load (the in-run latencies were measured minutes apart).
    """
    from slimformer.export.config import OnnxConfig
    from slimformer.export.onnx import export_onnx
    from slimformer.export.parity import session, time_session

    out, sessions = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for i, (label, (on, sub)) in enumerate(points.items()):
            m, q, _ = measure(on, sub, evald, calib, cfg.quant_method, cfg.calib_samples, False,
                              return_model=True, softmax=cfg.softmax)
            export_onnx(q, f"{d}/{i}.onnx", lat_in, OnnxConfig(check=False, lint=False))
            sessions[label] = session(f"{d}/{i}.onnx", threads=torch.get_num_threads())
            out[label] = {"val_acc": m.accuracy, "size": m.size, "test_acc": accuracy(q, test),
                          "latency_rounds": []}
        for _ in range(rounds):
            for label, sess in sessions.items():
                out[label]["latency_rounds"].append(
                    time_session(sess, lat_in, repeats, warmup=3)["median_ms"])
    for r in out.values():
        r["latency_ms"] = float(np.median(r["latency_rounds"]))
    return out


def run_task(task: str, args, work: Path) -> dict:
    val_rows, eval_rows, lr, batch, steps, lat_batch, space = TASKS[task]
    if args.min_blocks:
        space = space | {"min_blocks": args.min_blocks}
    if args.embedding_bits:
        space = space | {"embedding_bits": [b if b == "float" else int(b)
                                            for b in args.embedding_bits]}
    t0 = time.perf_counter()
    lm = load_model(ZooSpec(name=task))
    # the zoo models were trained on the whole train split, so sub-networks are measured on
    # half of the test split (seeded) and the chosen one is reported on the other half
    train = get_dataset(lm.dataset, "train")
    test, val = split_holdout(get_dataset(lm.dataset, "test"), val_rows, seed=0)
    calib = get_dataset(lm.dataset, "calib")
    objectives = ["accuracy", "size", "latency"]  # size first: the chosen point is the smallest
    cfg = SearchConfig(objectives=objectives, space=space, train_steps=args.train_steps or steps,
                       batch_size=batch, lr=lr, samples=args.samples, front_max=args.front,
                       nsga_trials=args.nsga_trials, population=40, eval_limit=eval_rows,
                       quant_method="repq", calib_samples=128, latency_repeats=args.repeats,
                       softmax=args.softmax,
                       latency_batch=lat_batch,
                       storage=str(work / "{study}.journal"), study=task,
                       supernet_path=str(work / "{study}.pt"))
    prog = (lambda s, d, n: print(f"  {task}: {s} {d}/{n}", flush=True)) if args.verbose else None
    res = search(lm.module, cfg, train, val, progress=prog, calib_data=calib)
    t_search = time.perf_counter() - t0
    ours = [r for r in res.measured if r["phase"] in ("sample", "front")]
    # random search with the same budget: our random draws plus as many more random ones as we
    # spent on anchors and the predicted front
    _, space_obj, ref_net, _ = _prepare(copy.deepcopy(lm.module), cfg, val, None)
    _, space_obj, net, _ = _prepare(copy.deepcopy(lm.module), cfg, val, None)
    ck = torch.load(cfg.supernet_file(), weights_only=True)
    net.model.load_state_dict(ck["state_dict"])
    net.load_state(ck["rank"])
    from slimformer.pipeline import latency_inputs

    evald = _subset(val, eval_rows)  # the rows search() measured on
    lat_in = latency_inputs(evald, cfg.latency_batch)
    rng = np.random.default_rng(1234)
    seen = {r["sub"] for r in res.measured}
    extra = []
    anchors = [r for r in ours if r["anchor"]]
    while len(extra) < len([r for r in ours if r["phase"] == "front"]) + len(anchors):
        sub = space_obj.random(rng)  # uniform, as random search draws
        if sub.key() in seen:
            continue
        seen.add(sub.key())
        m = measure(net, sub, evald, calib, cfg.quant_method, cfg.calib_samples, True, lat_in,
                    cfg.latency_repeats, softmax=cfg.softmax)
        extra.append({"sub": sub.key(), "phase": "random", "accuracy": m.accuracy,
                      "latency": m.latency, "size": m.size, "macs": m.macs,
                      "latency_form": m.latency_form})
    # the INT8 full model with float embedding tables (a labelled variant, not the reference)
    ref_sub = reference_subnet(space_obj)
    emb_float = None
    if ref_sub.ebits != "float":
        m = measure(ref_net, dataclasses.replace(ref_sub, ebits="float"), evald, calib,
                    cfg.quant_method, cfg.calib_samples, True, lat_in, cfg.latency_repeats,
                    softmax=cfg.softmax)
        emb_float = {"accuracy": m.accuracy, "latency": m.latency, "size": m.size,
                     "latency_form": m.latency_form}
    rand = [r for r in ours if r["phase"] == "sample" and not r["anchor"]] + extra
    ref_costs = res.reference["float_costs"]
    front_ours, front_rand = pareto_front(ours, objectives), pareto_front(rand, objectives)
    hv_ours = hypervolume(front_ours, objectives, ref_costs)
    hv_rand = hypervolume(front_rand, objectives, ref_costs)
    ref = res.reference
    target = [r for r in front_ours if r["accuracy"] >= ref["accuracy"] - 0.01 and (
        r["latency"] <= ref["latency"] / 2 or r["size"] <= ref["size"] / 2)]
    recheck = recheck_points(
        {"INT8 full (original weights)": (ref_net, ref_sub),
         "INT8 full (fine-tuned weights)": (net, ref_sub),
         **{f"target {r['sub']}": (net, space_obj.from_params(r["params_choice"]))
            for r in target[:args.recheck]},
         f"chosen {res.chosen['sub']}": (net, space_obj.from_params(res.chosen["params_choice"]))},
        evald, calib, cfg, lat_in, test, args.repeats)
    # the INT8 full model and the chosen sub-network on the whole test split
    from slimformer.quantize.api import quantize
    from slimformer.quantize.config import QuantConfig

    int8 = quantize(lm.module, QuantConfig(
        method="repq", calib_samples=128, softmax=cfg.softmax,
        embedding_bits=None if ref_sub.ebits == "float" else ref_sub.ebits), calib)
    out = {
        "task": task, "search_seconds": round(t_search, 1), "train": res.train,
        "space_size": res.space_size, "measured_ours": len(ours), "measured_random": len(rand),
        "anchors": len(anchors),
        "hv_ours": hv_ours, "hv_random": hv_rand, "predictors": res.predictors,
        "reference": {k: ref[k] for k in ("sub", "accuracy", "latency", "size", "macs",
                                          "latency_form")},
        "int8_full_float_embeddings": emb_float,
        "latency_float_fallbacks": sum(r.get("latency_form") == "float"
                                       for r in [*res.measured, *extra]),
        "float_costs": ref_costs,
        "int8_ort_dynamic_latency": ort_dynamic_latency(lm.module, lat_in, args.repeats),
        "front_ours": [{k: r[k] for k in ("sub", "phase", "anchor", "accuracy", "latency", "size")}
                       for r in front_ours],
        "measured": [{k: r.get(k) for k in ("sub", "phase", "accuracy", "latency", "size",
                                            "latency_form")} for r in [*res.measured, *extra]],
        "front_random": [{k: r[k] for k in ("sub", "phase", "accuracy", "latency", "size")}
                         for r in front_rand],
        "target_points": [r["sub"] for r in target],
        "chosen": {k: res.chosen[k] for k in ("sub", "accuracy", "latency", "size")},
        "test_rows": len(test), "test_fp32": accuracy(lm.module, test),
        "test_int8_full": accuracy(int8.model, test),
        "test_chosen": accuracy(res.model, test), "recheck": recheck,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    plot_front({"measured (ours)": [r for r in ours if r["phase"] == "sample"],
                "predicted front, measured": [r for r in ours if r["phase"] == "front"],
                "extra random": extra, "our front": front_ours, "random-search front":
                front_rand}, objectives, work / f"{task}-front.png", ref, task)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--front", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=None, help="default: per task")
    ap.add_argument("--nsga-trials", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--softmax", default="uniform", choices=["auto", "log_sqrt2", "uniform"],
                    help="attention-probability quantizer of every quantized model")
    ap.add_argument("--min-blocks", type=int, default=None, help="restrict the depth (default: "
                    "per task, 3)")
    ap.add_argument("--embedding-bits", nargs="+", default=None,
                    choices=["2", "3", "4", "5", "6", "7", "8", "float"],
                    help="embedding-table bit choices (default: per task; MiniLM 4 8 float)")
    ap.add_argument("--recheck", type=int, default=3, help="target points re-checked on the "
                    "test split and timed back to back with the INT8 full model")
    ap.add_argument("--out", default="runs/bench-nas")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("*.journal*"):  # fresh studies; a super-network of the same settings
        old.unlink()  # (same fingerprint) is reused, its training time is reported as measured
    rows = []
    for task in args.tasks:
        r = run_task(task, args, work)
        rows.append(r)
        (work / f"{task}.json").write_text(json.dumps(r, indent=2, default=str))
        print(json.dumps(r, indent=1, default=str), flush=True)
    print("\n| task | INT8 full (W8A8, E8) val acc / size B / QDQ ms | float ms / ORT dyn int8 ms | "
          "ours HV | random HV | measured each | target points | chosen | chosen val acc | "
          "latency x | size x | test acc FP32 / INT8 full / chosen | s |")
    print("|" + "---|" * 13)
    for r in rows:
        ref, ch = r["reference"], r["chosen"]
        print(f"| {r['task']} | {ref['accuracy']:.4f} / {ref['size']:,} / {ref['latency']:.2f} | "
              f"{r['float_costs']['latency']:.2f} / {r['int8_ort_dynamic_latency']:.2f} | "
              f"{r['hv_ours']:.4f} | {r['hv_random']:.4f} | {r['measured_ours']} | "
              f"{len(r['target_points'])} | {ch['sub']} | {ch['accuracy']:.4f} | "
              f"{ref['latency'] / ch['latency']:.2f} | {ref['size'] / ch['size']:.2f} | "
              f"{r['test_fp32']:.4f} / {r['test_int8_full']:.4f} / {r['test_chosen']:.4f} | "
              f"{r['seconds']:.0f} |")
    print("\n| task | re-checked point | val acc | test acc | size B | QDQ ms (median of rounds) |")
    print("|" + "---|" * 6)
    for r in rows:
        for label, c in r["recheck"].items():
            print(f"| {r['task']} | {label} | {c['val_acc']:.4f} | {c['test_acc']:.4f} | "
                  f"{c['size']:,} | {c['latency_ms']:.2f} |")

if __name__ == "__main__":
    main()
