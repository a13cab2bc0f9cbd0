"""hls4ml FPGA projects of compressed transformers, C-simulated against our fixed-point reference.

Public API (loaded lazily, so importing the package stays cheap)::

    from slimformer.hardware import HlsConfig, build_hls
    res = build_hls(qmodel, HlsConfig(clock_period_ns=5.0), "out/hls", calib_data, eval_data)
    res.csim.accuracy_csim, res.csim.agreement_reference, res.estimate.latency_us
"""

from __future__ import annotations

from slimformer.hardware.config import HlsConfig, ReuseOverride
from slimformer.lazy import lazy_getattr

_LAZY = {
    "build_hls": "slimformer.hardware.api",
    "HlsResult": "slimformer.hardware.api",
    "CsimResult": "slimformer.hardware.api",
    "summary": "slimformer.hardware.api",
    "lower": "slimformer.hardware.lowering",
    "SUPPORTED": "slimformer.hardware.trace",
    "Estimate": "slimformer.hardware.estimate",
    "parse_csynth_xml": "slimformer.hardware.synth",
    "parse_baseline_json": "slimformer.hardware.synth",
    "FixedType": "slimformer.hardware.fixed",
}

__all__ = ["HlsConfig", "ReuseOverride", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
