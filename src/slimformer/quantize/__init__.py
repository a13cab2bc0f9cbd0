"""Post-training quantization in the RepQuant style, and simple baselines.

Public API (loaded lazily, so importing the package stays cheap)::

    from slimformer.quantize import QuantConfig, quantize, to_inference
    result = quantize(model, QuantConfig(method="repquant", weight_bits=4, act_bits=4), calib)
    qmodel = to_inference(result.model)
    save_quantized(qmodel, "out/q", model_spec); qmodel = load_quantized("out/q")
"""

from __future__ import annotations

from slimformer.lazy import lazy_getattr
from slimformer.quantize.config import LayerOverride, QuantConfig

_LAZY = {
    "quantize": "slimformer.quantize.api",
    "QuantResult": "slimformer.quantize.api",
    "to_inference": "slimformer.quantize.inference",
    "save_quantized": "slimformer.quantize.serialize",
    "load_quantized": "slimformer.quantize.serialize",
    "QuantizedModel": "slimformer.quantize.state",
}

__all__ = ["LayerOverride", "QuantConfig", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
