"""Pruning benchmark: UPop vs magnitude pruning at 1.5x / 2x / 3x on the zoo's real tasks.

For each task and reduction x of the prunable parameters (attention q/k/v/out + MLP fc1/fc2;
ratio ``1 - 1/x``): params, MACs/sample, accuracy, ONNX Runtime CPU latency (float, median)
against the unpruned model, search and fine-tuning seconds. UPop cuts head dimensions and MLP
units by default (its own units; ``--upop-structures``); the magnitude baseline (every site cut by
the same fraction, smallest weight norms first) cuts heads and MLP neurons (``--magnitude-
structures``) and gets the same number of training steps as UPop (search + fine-tune steps, all
spent fine-tuning). A control row fine-tunes the unpruned model with the same budget and loss
(distillation from itself + cross-entropy), since fine-tuning alone can move accuracy. Rows are
appended to ``--out`` (JSON lines) as they finish, so a partial run keeps its numbers.

    .venv/bin/python benchmarks/prune.py --tasks vit-fmnist --search-steps 100 --finetune-steps 200
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

TASKS = {"vit-fmnist": "fashion-mnist", "minilm-trec": "trec", "minilm-vader": "vader-movie",
         "clip-fmnist": "fashion-mnist"}
# (fine-tune lr, search lr): the search trains the weights as hard as fine-tuning does (vit-fmnist
# 2x, 600 steps: search lr 2e-4 -> 0.8735, 5e-4 -> 0.8754)
LR = {"vit-fmnist": (5e-4, 5e-4), "clip-fmnist": (2e-4, 2e-4), "minilm-trec": (5e-5, 5e-5),
      "minilm-vader": (5e-5, 5e-5)}


def _accuracy(model, data) -> float:
    from slimformer.prune.api import _accuracy

    return _accuracy(model, data)


def main() -> None:
    """Run the benchmark and print the table."""
    from slimformer.data.datasets import get_dataset
    from slimformer.models.loading import load_model
    from slimformer.models.spec import ZooSpec
    from slimformer.models.structure import discover
    from slimformer.nas.measure import exported_latency
    from slimformer.pipeline import latency_inputs
    from slimformer.prune import PruneConfig, prune
    from slimformer.prune.train import finetune, make_loss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["vit-fmnist", "minilm-trec", "clip-fmnist"],
                    choices=sorted(TASKS))
    ap.add_argument("--reductions", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    ap.add_argument("--methods", nargs="+", default=["dense", "upop", "magnitude"],
                    choices=["dense", "upop", "magnitude"],
                    help="dense: control row, the unpruned model fine-tuned with the same "
                    "budget and loss (separates pruning from the effect of training)")
    ap.add_argument("--search-steps", type=int, default=100)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--latency-batch", type=int, default=32)
    ap.add_argument("--latency-repeats", type=int, default=20)
    ap.add_argument("--upop-structures", default="dims,mlp",
                    help="what UPop cuts (UPop's own unit of attention is the head dimension)")
    ap.add_argument("--magnitude-structures", default="heads,mlp",
                    help="what the magnitude baseline cuts (the peer baseline: heads + neurons)")
    ap.add_argument("--upop-score", default="gradient", choices=["gradient", "taylor"],
                    help="UPop's ranking: signed mask gradients (the paper) or their squares")
    ap.add_argument("--upop-momentum", type=float, default=0.0,
                    help="score_momentum of the UPop search")
    ap.add_argument("--seed", type=int, default=0, help="seed of data order (PruneConfig.seed)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for search / fine-tuning (default: torch's)")
    ap.add_argument("--ort-threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_prune.jsonl")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    structures = {"upop": args.upop_structures.split(","),
                  "magnitude": args.magnitude_structures.split(",")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    for task in args.tasks:
        ds = TASKS[task]
        lm = load_model(ZooSpec(name=task))
        train = get_dataset(ds, "train")
        test = get_dataset(ds, "test", args.eval_limit)
        lat_in = latency_inputs(test, args.latency_batch)
        if "attention_mask" in lat_in:
            keep = int(lat_in["attention_mask"].sum(1).max())
            lat_in = {k: v[:, :keep] for k, v in lat_in.items()}
        base = lm.module.eval()
        smap = discover(base, lm.example_inputs(2))
        base_lat = exported_latency(base.eval(), lat_in, args.latency_repeats,
                                    threads=args.ort_threads)
        base_acc = _accuracy(base, test)
        emit({"task": task, "method": "unpruned", "x": 1.0, "params": smap.params,
              "macs": smap.macs, "accuracy": base_acc, "ort_ms": base_lat, "speedup": 1.0,
              "search_s": 0.0, "finetune_s": 0.0})
        lr, search_lr = LR[task]
        if "dense" in args.methods:  # control: the unpruned model, same training budget
            cfg = PruneConfig(finetune_steps=args.search_steps + args.finetune_steps,
                              batch_size=args.batch_size, lr=lr)
            dense = copy.deepcopy(base)
            t0 = time.perf_counter()
            finetune(dense, train, cfg, make_loss(cfg.distill, cfg.temperature, base),
                     cfg.finetune_steps)
            ft_s = time.perf_counter() - t0
            acc = _accuracy(dense, test)
            emit({"task": task, "method": "unpruned, fine-tuned", "x": 1.0, "params": smap.params,
                  "macs": smap.macs, "accuracy": acc, "delta": acc - base_acc, "ort_ms": base_lat,
                  "speedup": 1.0, "search_s": 0.0, "finetune_s": ft_s})
        for x in args.reductions:
            for method in (m for m in args.methods if m != "dense"):
                steps = args.finetune_steps + (args.search_steps if method == "magnitude" else 0)
                cfg = PruneConfig(ratio=1 - 1 / x, method=method, search_steps=args.search_steps,
                                  finetune_steps=steps, batch_size=args.batch_size, lr=lr,
                                  search_lr=search_lr, interval=max(1, args.search_steps // 20),
                                  structures=structures[method], seed=args.seed,
                                  **({"score": args.upop_score,
                                      "score_momentum": args.upop_momentum}
                                     if method == "upop" else {}))
                res = prune(base, cfg, train, None, structure=smap,
                            inputs=lm.example_inputs(2))
                acc = _accuracy(res.model, test)
                lat = exported_latency(res.model.eval(), lat_in, args.latency_repeats,
                                       threads=args.ort_threads)
                emit({"task": task, "method": method, "x": x, "params": res.params_after,
                      "macs": res.macs_after, "prunable_x": round(res.reduction, 3),
                      "accuracy": acc, "delta": acc - base_acc, "ort_ms": lat,
                      "speedup": base_lat / lat, "search_s": res.search_seconds,
                      "finetune_s": res.finetune_seconds,
                      "structures": ",".join(cfg.structures), "seed": cfg.seed,
                      **({"score": cfg.score, "score_momentum": cfg.score_momentum}
                         if method == "upop" else {}),
                      "kept_heads": {i: k for i, (k, _) in res.kept["heads"].items()},
                      "kept_dims": {i: qk for i, (qk, _, _) in res.kept["dims"].items()},
                      "kept_mlp": {i: k for i, (k, _) in res.kept["mlp"].items()}})
    print()
    print("| task | method | cuts | x | params | MACs/sample | accuracy | vs unpruned (points) | ORT ms (b="
          f"{args.latency_batch}) | speed-up | search s | fine-tune s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['method']} | {r.get('structures', '')} | {r['x']:g} | "
              f"{r['params']:,} | "
              f"{r['macs'] / 1e6:,.1f}M | {r['accuracy']:.4f} | {100 * r.get('delta', 0):+.2f} | "
              f"{r['ort_ms']:.2f} | {r['speedup']:.2f}x | {r['search_s']:.0f} | "
              f"{r['finetune_s']:.0f} |")


if __name__ == "__main__":
    main()
