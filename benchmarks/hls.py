"""hls4ml benchmark: vit-digits-seq quantized with power-of-two scales -> hls4ml project.

For each setting: float and quantized (PyTorch) accuracy on the 497 test rows, C-simulated
accuracy (hls4ml compile with g++ + predict), prediction agreement and max / mean output error
between the C simulation and our fixed-point reference, and the estimated latency (cycles and us
at 200 MHz), DSP and LUT (an estimate, not synthesis). Vivado/Vitis are not installed here: the
synthesis command is printed instead.

Run: ``.venv/bin/python benchmarks/hls.py`` (about 1-2 min per setting on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from slimformer.data.datasets import get_dataset
from slimformer.hardware.api import build_hls
from slimformer.hardware.config import HlsConfig, ReuseOverride
from slimformer.models.zoo import load_zoo_model
from slimformer.quantize import QuantConfig, quantize, to_inference

# (label, weight bits, act bits or None for the float model, reuse factor, overrides)
SETTINGS = (
    ("W8A8 RF1", 8, 8, 1, ()),
    ("W6A8 RF1", 6, 8, 1, ()),
    ("W8A8 MLP RF4", 8, 8, 1, (ReuseOverride(pattern="blocks.*.fc*", reuse_factor=4),)),
    ("W8A8 RF8", 8, 8, 8, ()),
    ("float (types from ranges)", None, None, 1, ()),
)


def main() -> None:
    """Build every setting and print one Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="*", help="labels to run (default: all)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    model = load_zoo_model("vit-digits-seq").eval()
    calib, test = get_dataset("digits-seq", "calib"), get_dataset("digits-seq", "test")
    rows = []
    for label, wb, ab, rf, over in SETTINGS:
        if args.settings and label not in args.settings:
            continue
        net = model
        if wb is not None:
            net = to_inference(quantize(model, QuantConfig(
                method="minmax", weight_bits=wb, act_bits=ab, softmax="none",
                power_of_two_scales=True), calib).model)
        cfg = HlsConfig(reuse_factor=rf, reuse_overrides=list(over))
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            r = build_hls(net, cfg, Path(tmp) / "prj", calib, test)
        c, e = r.csim, r.estimate
        q = "-" if c.accuracy_quantized is None else f"{c.accuracy_quantized:.4f}"
        rows.append(f"| {label} | {c.accuracy_float:.4f} | {q} | {c.accuracy_csim:.4f} | "
                    f"{c.agreement_reference:.4f} | {c.max_error:.3g} / {c.mean_error:.3g} | "
                    f"{c.max_error_float:.3g} / {c.mean_error_float:.3g} | {e.cycles} | "
                    f"{e.latency_us:.2f} | {e.dsp:,} | {e.lut:,} | "
                    f"{r.seconds['compile']:.0f} | {time.perf_counter() - t0:.0f} |")
        print(rows[-1], flush=True)
    print(f"\nvit-digits-seq, {len(test)} test rows, Vitis backend, part {cfg.part}, "
          f"{cfg.clock_mhz:.0f} MHz, io_parallel, Latency strategy\n")
    print("| setting | float acc | quantized acc (torch) | C-sim acc | C-sim = reference "
          "(agreement) | C-sim vs reference max / mean abs error | C-sim vs float max / mean "
          "| est. cycles | est. latency (us) | est. DSP | est. LUT | compile (s) | total (s) |")
    print("|---" * 13 + "|")
    print("\n".join(rows))
    print(f"\nsynthesis (not run here): {r.synth_command}")


if __name__ == "__main__":
    main()
