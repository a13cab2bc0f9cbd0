"""Export: ONNX (float and QDQ) checked against ONNX Runtime, TensorRT engines, QDQ lint.

Public API (loaded lazily, so importing the package stays cheap)::

    from slimformer.export import OnnxConfig, export_onnx, lint_qdq, build_engine
    result = export_onnx(model_or_quantized, "model.onnx", {"input_ids": ids, ...})
    result.parity, result.fusion, result.lint   # ORT vs PyTorch, integer kernels, TensorRT rules
    build_engine("model.onnx", "model.plan", TensorRTConfig())  # needs `import tensorrt`
    export_decoder(causal_lm, "decoder.onnx")  # one graph for prefill + decode, KV cache in/out
    generate_onnx(OrtDecoder("decoder.onnx"), prompt_ids, 32)  # greedy tokens, tokens/s
"""

from __future__ import annotations

from slimformer.export.config import OnnxConfig, TensorRTConfig
from slimformer.lazy import lazy_getattr

_LAZY = {
    "export_onnx": "slimformer.export.onnx",
    "OnnxResult": "slimformer.export.onnx",
    "lint_qdq": "slimformer.export.lint",
    "Finding": "slimformer.export.lint",
    "build_engine": "slimformer.export.tensorrt",
    "trtexec_command": "slimformer.export.tensorrt",
    "tensorrt_available": "slimformer.export.tensorrt",
    "ort_latency": "slimformer.export.ortrun",
    "export_decoder": "slimformer.export.decoder",
    "DecoderConfig": "slimformer.export.decoder",
    "OrtDecoder": "slimformer.export.ortgen",
    "generate_onnx": "slimformer.export.ortgen",
}

__all__ = ["OnnxConfig", "TensorRTConfig", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
