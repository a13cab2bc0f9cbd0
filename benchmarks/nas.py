"""NAS benchmark: our search (SimQ-NAS / InstaTune) against random search and the INT8 full model.

Per task, in one run: fine-tune the super-network, measure the INT8 full model (uniformly W8A8
with the same method, embedding tables at 8 bits) and ``--samples``
sub-networks (anchors first: the full model at each uniform weight bit-width and the smallest
sub-network; then random draws),
fit the predictors, run NSGA-II on them and measure ``--front`` predicted-front sub-networks.
Random search gets the same budget: our random draws plus as many more random ones as we spent
on anchors and the predicted front. Both fronts are compared by hypervolume (losses
1 - accuracy and cost / full float model cost).

The target is judged against the **fair reference**: the INT8 full model built from the
super-network's fine-tuned full weights (every sub-network inherits those weights, so the
sandwich fine-tuning is credited to neither side). The INT8 full model built from the original
zoo weights (``search()``'s own reference) is kept as a second, labelled reference.

The zoo models were trained on the whole train split, so accuracy is measured on half of the
test split (seeded; vit-fmnist: 2,000 of its rows) and the chosen sub-network, both INT8 full
models and FP32 are then evaluated on the other half (``--recheck``: also the target and
near-target points, each judged against the fair reference on those rows). Latency: ONNX
Runtime, the quantized (sliced) model exported by ``export_onnx`` in QDQ form (the float model
where that export fails, counted in ``latency_float_fallbacks``), median of repeats (batch 16
for vit-fmnist, 1 for MiniLM); the INT8 full model is also measured with float embedding tables
(labelled as such; ``--skip-float-embeddings`` leaves it out) and the float model with ONNX
Runtime's ``quantize_dynamic`` (int8 weights) as a latency peer. Quantized sub-networks use the
uniform 8-bit softmax (``--softmax``; the fast form in ONNX Runtime on CPUs), the references
too. ``--quant-method repquant`` (with ``--clip-steps`` / ``--recon-steps``) quantizes every
model, the references included, with learned weight rounding.

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
from slimformer.nas.api import _prepare, _subset, choose, reference_subnet, search, split_holdout
from slimformer.nas.config import SearchConfig
from slimformer.nas.measure import measure
from slimformer.nas.pareto import hypervolume, pareto_front, plot_front
from slimformer.quantize.config import QuantConfig

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
    from slimformer.export.ortrun import ort_latency

    with tempfile.TemporaryDirectory() as d:
        export_onnx(model, f"{d}/f.onnx", inputs, OnnxConfig(check=False, lint=False))
        quantize_dynamic(f"{d}/f.onnx", f"{d}/q.onnx", weight_type=QuantType.QInt8,
                         per_channel=True)
        return ort_latency(f"{d}/q.onnx", inputs, repeats, warmup=3,
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
    from slimformer.export.ortrun import session, time_session

    out, sessions = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for i, (label, (on, sub)) in enumerate(points.items()):
            m, q, _ = measure(on, sub, evald, calib, cfg.quant, False, return_model=True)
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
    if args.weight_bits:
        space = space | {"weight_bits": [b if b == "float" else int(b) for b in args.weight_bits]}
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
                       quant=QuantConfig(method=args.quant_method, calib_samples=128,
                                         clip_steps=args.clip_steps,
                                         recon_steps=args.recon_steps, softmax=args.softmax),
                       latency_repeats=args.repeats,
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

    def measure_timed(on, sub):
        return measure(on, sub, evald, calib, cfg.quant, True, lat_in, cfg.latency_repeats)

    rng = np.random.default_rng(1234)
    seen = {r["sub"] for r in res.measured}
    extra = []
    anchors = [r for r in ours if r["anchor"]]
    while len(extra) < len([r for r in ours if r["phase"] == "front"]) + len(anchors):
        sub = space_obj.random(rng)  # uniform, as random search draws
        if sub.key() in seen:
            continue
        seen.add(sub.key())
        m = measure_timed(net, sub)
        extra.append({"sub": sub.key(), "phase": "random", "accuracy": m.accuracy,
                      "latency": m.latency, "size": m.size, "macs": m.macs,
                      "latency_form": m.latency_form})
    # the fair reference: the INT8 full model of the fine-tuned weights (reused when the search
    # measured it, e.g. as its W8 anchor; it is in no front, so no budget changes)
    ref_sub = reference_subnet(space_obj)
    fair = next((r for r in res.measured if r["sub"] == ref_sub.key()
                 and r["phase"] != "reference"), None)
    if fair is None:
        m = measure_timed(net, ref_sub)
        fair = {"sub": ref_sub.key(), "phase": "fair reference", "accuracy": m.accuracy,
                "latency": m.latency, "size": m.size, "macs": m.macs,
                "latency_form": m.latency_form}
    # the INT8 full model (original weights) with float embedding tables (labelled variant)
    emb_float = None
    if ref_sub.ebits != "float" and not args.skip_float_embeddings:
        m = measure_timed(ref_net, dataclasses.replace(ref_sub, ebits="float"))
        emb_float = {"accuracy": m.accuracy, "latency": m.latency, "size": m.size,
                     "latency_form": m.latency_form}
    rand = [r for r in ours if r["phase"] == "sample" and not r["anchor"]] + extra
    ref_costs = res.reference["float_costs"]
    front_ours, front_rand = pareto_front(ours, objectives), pareto_front(rand, objectives)
    hv_ours = hypervolume(front_ours, objectives, ref_costs)
    hv_rand = hypervolume(front_rand, objectives, ref_costs)
    ref = res.reference  # original weights

    def hits(against):
        return [r for r in front_ours if r["accuracy"] >= against["accuracy"] - 0.01 - 1e-9 and (
            r["latency"] <= against["latency"] / 2 or r["size"] <= against["size"] / 2)]

    target, target_orig = hits(fair), hits(ref)
    # the front point chosen against the fair reference (search() chooses against its own)
    chosen_fair = choose(front_ours, fair, objectives, cfg.max_drop)
    # near misses: the front points within 1 point of the fair reference, smallest first, and
    # the most accurate ones that are 2x smaller (what the target asks, and by how much it fails)
    near = sorted([r for r in front_ours if r["accuracy"] >= fair["accuracy"] - 0.01],
                  key=lambda r: r["size"])[:2]
    small = sorted([r for r in front_ours if r["size"] <= fair["size"] / 2],
                   key=lambda r: -r["accuracy"])[:1]
    points = {"INT8 full (fine-tuned weights)": (net, ref_sub),
              "INT8 full (original weights)": (ref_net, ref_sub)}
    for tag, r in [*(("target", r) for r in target[:args.recheck]),
                   ("chosen vs fair", chosen_fair), ("chosen vs original", res.chosen),
                   *(("near", r) for r in near), *(("best 2x smaller", r) for r in small)]:
        if r["sub"] != ref_sub.key() and not any(k.endswith(r["sub"]) for k in points):
            points[f"{tag} {r['sub']}"] = (net, space_obj.from_params(r["params_choice"]))
    recheck = recheck_points(points, evald, calib, cfg, lat_in, test, args.repeats)
    fair_re = recheck["INT8 full (fine-tuned weights)"]
    for label, c in recheck.items():  # test-row verdict of each re-checked point vs fair
        c["test_delta_pt"] = round(100 * (c["test_acc"] - fair_re["test_acc"]), 2)
        c["size_x"] = round(fair_re["size"] / c["size"], 3)
        c["latency_x"] = round(fair_re["latency_ms"] / c["latency_ms"], 3)
        c["meets_target"] = bool(c["test_delta_pt"] >= -1.0 - 1e-9 and (
            c["size_x"] >= 2 or c["latency_x"] >= 2) and not label.startswith("INT8"))
    out = {
        "task": task, "search_seconds": round(t_search, 1), "train": res.train,
        "space_size": res.space_size, "measured_ours": len(ours), "measured_random": len(rand),
        "anchors": len(anchors),
        "hv_ours": hv_ours, "hv_random": hv_rand, "predictors": res.predictors,
        "quant": {"method": cfg.quant.method, "clip_steps": cfg.quant.clip_steps,
                  "recon_steps": cfg.quant.recon_steps, "softmax": cfg.quant.softmax},
        "reference_fair": {k: fair.get(k) for k in ("sub", "phase", "accuracy", "latency", "size",
                                                     "macs", "latency_form")},
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
        "target_points_vs_original": [r["sub"] for r in target_orig],
        "target_met_on_test_rows": any(c["meets_target"] for c in recheck.values()),
        "chosen": {k: res.chosen[k] for k in ("sub", "accuracy", "latency", "size")},
        "chosen_vs_fair": {k: chosen_fair[k] for k in ("sub", "accuracy", "latency", "size")},
        "test_rows": len(test), "test_fp32": accuracy(lm.module, test),
        "test_int8_full": fair_re["test_acc"],
        "test_int8_full_original": recheck["INT8 full (original weights)"]["test_acc"],
        "test_chosen": accuracy(res.model, test), "recheck": recheck,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    plot_front({"measured (ours)": [r for r in ours if r["phase"] == "sample"],
                "predicted front, measured": [r for r in ours if r["phase"] == "front"],
                "extra random": extra, "our front": front_ours, "random-search front":
                front_rand}, objectives, work / f"{task}-front.png", fair, task)
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
    ap.add_argument("--weight-bits", nargs="+", default=None,
                    help="per-layer weight bit choices (default: 4 6 8)")
    ap.add_argument("--embedding-bits", nargs="+", default=None,
                    choices=["2", "3", "4", "5", "6", "7", "8", "float"],
                    help="embedding-table bit choices (default: per task; MiniLM 4 8 float)")
    ap.add_argument("--recheck", type=int, default=3, help="target points re-checked on the "
                    "test split and timed back to back with the INT8 full model")
    ap.add_argument("--quant-method", default="repq",
                    choices=["minmax", "percentile", "repq", "repquant"],
                    help="how every model (sub-networks and both references) is quantized")
    ap.add_argument("--clip-steps", type=int, default=100, help="repquant: dual-clipping steps")
    ap.add_argument("--recon-steps", type=int, default=100,
                    help="repquant: weight-rounding (reconstruction) steps per Linear")
    ap.add_argument("--skip-float-embeddings", action="store_true",
                    help="do not measure the labelled INT8 variant with float embedding tables")
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
    print("\n| task | quant | INT8 full fine-tuned (fair) val acc / size B / QDQ ms | INT8 full "
          "original val acc / size B / QDQ ms | float ms / ORT dyn int8 ms | ours HV | random HV "
          "| measured each | target points (fair / original) | chosen vs fair | val acc | "
          "size x | latency x | test acc FP32 / INT8 fair / INT8 original | s |")
    print("|" + "---|" * 15)
    for r in rows:
        f, o, ch, q = r["reference_fair"], r["reference"], r["chosen_vs_fair"], r["quant"]
        print(f"| {r['task']} | {q['method']} clip {q['clip_steps']} recon {q['recon_steps']} | "
              f"{f['accuracy']:.4f} / {f['size']:,} / {f['latency']:.2f} | "
              f"{o['accuracy']:.4f} / {o['size']:,} / {o['latency']:.2f} | "
              f"{r['float_costs']['latency']:.2f} / {r['int8_ort_dynamic_latency']:.2f} | "
              f"{r['hv_ours']:.4f} | {r['hv_random']:.4f} | {r['measured_ours']} | "
              f"{len(r['target_points'])} / {len(r['target_points_vs_original'])} | {ch['sub']} | "
              f"{ch['accuracy']:.4f} | {f['size'] / ch['size']:.2f} | "
              f"{f['latency'] / ch['latency']:.2f} | {r['test_fp32']:.4f} / "
              f"{r['test_int8_full']:.4f} / {r['test_int8_full_original']:.4f} | "
              f"{r['seconds']:.0f} |")
    print("\n| task | re-checked point | val acc | test acc | test delta vs fair (pt) | size B | "
          "size x | QDQ ms (median of rounds) | latency x | meets target |")
    print("|" + "---|" * 10)
    for r in rows:
        for label, c in r["recheck"].items():
            print(f"| {r['task']} | {label} | {c['val_acc']:.4f} | {c['test_acc']:.4f} | "
                  f"{c['test_delta_pt']:+.2f} | {c['size']:,} | {c['size_x']:.2f} | "
                  f"{c['latency_ms']:.2f} | {c['latency_x']:.2f} | {c['meets_target']} |")


if __name__ == "__main__":
    main()
