"""Calibration at scale: a ~1B-parameter Llama decoder quantized on this machine's CPUs.

The model is built once from a ``LlamaConfig`` (TinyLlama-1.1B's shape: 22 layers, width 2048,
MLP 5632, 32 heads / 4 KV heads, vocabulary 32000) with fan-in-scaled random weights
(``N(0, 1/fan_in)``, norms at 1), saved as safetensors under ``--cache`` (outside the checkout),
and loaded from there (memory-mapped) by each run. Each configuration runs in its own process
(peak RSS is per process): ``quantize()`` in place (the float model is not kept) on ``--rows``
rows of ``--tokens`` random token ids, seeded, and the output check on them. Printed: a table of
seconds (wall and CPU), peak RSS and output SQNR vs float, with the CPU's name.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/scale.py                 # W8A8 minmax, INT4 g128
    .venv/bin/python benchmarks/scale.py --configs int4 --rows 4 --tokens 64
    .venv/bin/python benchmarks/scale.py --layers 4   # the same layer shape, 4 layers (extrapolate)

W8A8 runs block-wise under ``--max-memory`` (default 8GB); INT4 is block-wise GPTQ anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
CONFIGS = {  # name -> QuantConfig fields
    "w8a8": dict(method="minmax", weight_bits=8, act_bits=8, smooth="off"),  # + max_memory
    "int4": dict(weight_only=True, method="gptq", weight_bits=4, group_size=128),
}


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(folder: Path, layers: int = SHAPE["num_hidden_layers"]) -> None:
    """The random-weight model (``layers`` decoder layers) as safetensors in ``folder`` (once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm gains
            else:  # fan-in scaled: activations keep their scale through the layers
                p.normal_(0.0, p.shape[-1] ** -0.5)
    model.save_pretrained(folder, safe_serialization=True)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {folder}",
          file=sys.stderr)


def one(folder: Path, name: str, rows: int, tokens: int, max_memory: str) -> dict:
    """Quantize with configuration ``name`` in this process; its measurements.

    Activation configurations run under ``max_memory`` (block-wise calibration); progress lines
    go to stderr.
    """
    import torch
    from transformers import LlamaForCausalLM

    from slimformer.cli.common import _log_lines
    from slimformer.data.datasets import TensorDictDataset
    from slimformer.quantize.api import quantize
    from slimformer.quantize.config import QuantConfig

    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    ids = torch.randint(2, SHAPE["vocab_size"], (rows, tokens),
                        generator=torch.Generator().manual_seed(0))
    data = TensorDictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    extra = {} if CONFIGS[name].get("weight_only") else {"max_memory": max_memory}
    cfg = QuantConfig(calib_samples=rows, calib_batch_size=max(1, rows // 2), **CONFIGS[name],
                      **extra)
    c0, t0 = time.process_time(), time.perf_counter()
    res = quantize(model, cfg, data, inplace=True, progress=_log_lines())
    return {"config": name, "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
            "load_s": round(load_s, 1), "quantize_s": round(time.perf_counter() - t0, 1),
            "quantize_cpu_s": round(time.process_time() - c0, 1),
            "output_sqnr_db": None if res.output_sqnr_db is None else round(res.output_sqnr_db, 2),
            "max_memory": extra.get("max_memory"), "notes": res.notes[:2],
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                                 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/slimformer/scale-llama-1b")
    ap.add_argument("--configs", default="w8a8,int4", help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max-memory", default="8GB", help="budget of the activation configs")
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"],
                    help="decoder layers (fewer: the same shape per layer, to extrapolate from "
                         "where memory or time is short; its own cache folder)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: one configuration
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.cache, a.one, a.rows, a.tokens, a.max_memory)))
        return
    if a.layers != SHAPE["num_hidden_layers"]:
        a.cache = a.cache.with_name(f"{a.cache.name}-{a.layers}l")
    build(a.cache, a.layers)
    results = []
    for name in a.configs.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", name, "--cache", str(a.cache),
                              "--rows", str(a.rows), "--tokens", str(a.tokens),
                              "--max-memory", a.max_memory],
                             stdout=subprocess.PIPE, text=True, check=False)  # stderr: progress
        if out.returncode:
            results.append({"config": name, "error": f"exit {out.returncode} (stderr above)"})
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(f"CPU: {cpu_name()}, {os.environ['OMP_NUM_THREADS']} threads; {a.rows} rows x "
          f"{a.tokens} tokens; {a.layers} layers; max_memory {a.max_memory} (activation configs)")
    print(f"{'config':8} {'params':>7} {'load s':>7} {'quantize s':>10} {'CPU s':>7} "
          f"{'peak RSS GB':>11} {'out SQNR dB':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['config']:8} failed: {r['error']}")
            continue
        print(f"{r['config']:8} {r['params_b']:6.2f}B {r['load_s']:7.1f} {r['quantize_s']:10.1f} "
              f"{r['quantize_cpu_s']:7.1f} {r['peak_rss_gb']:11.2f} {r['output_sqnr_db']!s:>11}")


if __name__ == "__main__":
    main()
