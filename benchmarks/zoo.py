"""Measure every zoo model on this machine: params, MACs, FP32 metric, full eval time, latency.

Run: ``.venv/bin/python benchmarks/zoo.py`` (prints a Markdown table; about 10 s per model).
"""

from __future__ import annotations

import time

import torch

from slimformer.data.datasets import get_dataset
from slimformer.models.evaluate import measure_latency, model_size
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.models.structure import discover
from slimformer.models.zoo import ZOO, card
from slimformer.pipeline import evaluate_model, latency_inputs


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | task | data (eval rows) | params | MACs/sample | FP32 metric | recorded | "
          "eval time (s) | latency b=1 (ms) | latency b=32 (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in ZOO.items():
        lm = load_model(ZooSpec(name=name))
        smap = discover(lm.module, lm.example_inputs(2))
        ds = get_dataset(entry.dataset, "test")
        t0 = time.perf_counter()
        preds, labels = evaluate_model(lm.module, ds, 500)
        secs = time.perf_counter() - t0
        acc = float((preds == labels).float().mean())
        lat = [measure_latency(lm.module, latency_inputs(ds, b), 50)["median_ms"] for b in (1, 32)]
        print(f"| {name} | {entry.task} | {entry.dataset} ({len(ds)}) | "
              f"{model_size(lm.module)['params']:,} | {smap.macs / 1e6:.3g}M | {acc:.4f} | "
              f"{card(name).get('fp32_metric')} | {secs:.1f} | {lat[0]:.2f} | {lat[1]:.2f} |")


if __name__ == "__main__":
    main()
