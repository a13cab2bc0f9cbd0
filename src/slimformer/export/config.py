"""Export configs: ONNX (float / QDQ) and TensorRT engine building."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ACCURACY_LEVELS = (0, 1, 4)  # MatMulNBits: unset / fp32 activations / int8 activations
# The full-sequence graph: 0, so ONNX Runtime computes what PyTorch does (its parity bar is a
# cosine of 0.9999 on every output).
DEFAULT_ACCURACY_LEVEL = 0
# The KV-cache decoder graph: 4 (int8 activations in blocks of at most export.nbits.INT8_BLOCK
# inputs), falling back to 0 under the greedy-token bar. Measured 2026-12-06 (ORT 1.32, AMD EPYC
# AVX-512 VNNI, 2 threads, idle; SmolLM2-135M INT4 g128, 512-token nyt prompt, 32 decode steps,
# 5 alternating rounds): level 0 decodes at 0.25-0.28x the float graph's tokens/s and prefills
# at 0.88x; level 4 with blocks of 32: decode 1.85-2.43x, prefill 1.08-1.10x, logits 32.2 dB vs
# our PyTorch model, next-token agreement 95.4% teacher-forced over 1,024 tokens (docs/export.md)
DECODER_ACCURACY_LEVEL = 4


class OnnxConfig(BaseModel):
    """How to write an ONNX file.

    ``dynamic``: batch (and sequence, for integer token inputs) axes are symbolic; when the model
    cannot be exported that way, the export falls back to static shapes and says so.
    ``parity_min_cosine``: float exports whose ONNX Runtime output is less similar to PyTorch's than
    this fail (quantized exports are compared in output quantization steps and only reported).
    Every output of the model is exported, named by its path
    (:func:`slimformer.models.outputs.leaves`), and every parity figure covers all of them.

    ``target``: where the file will run; it decides the QDQ form (weight and activation storage,
    opset, float or quantized attention; see :mod:`slimformer.export.targets`): ``ort-cpu``
    (ONNX Runtime on a CPU, the form chosen by ``isa``), ``openvino``, ``tensorrt``, ``portable``
    (plain QDQ as the quantizer simulates it); ``auto`` is ``ort-cpu``. ``isa`` (``ort-cpu``
    only): ``auto`` detects the exporting machine's CPU (``/proc/cpuinfo`` flags), or name the
    deployment CPU: ``amx`` / ``vnni`` (AVX-512 VNNI or AVX-VNNI) / ``avx2`` / ``other``.
    ``opset``: None takes the target's (23 for ``ort-cpu`` where the installed onnx and ONNX
    Runtime run the standard ``Attention`` op, else 20).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    opset: Literal[17, 18, 19, 20, 21, 22, 23] | None = None
    target: Literal["auto", "ort-cpu", "openvino", "tensorrt", "portable"] = "auto"
    isa: Literal["auto", "amx", "vnni", "avx2", "other"] = "auto"
    dynamic: bool = True
    check: bool = True  # onnx.checker + ONNX Runtime parity (at a second shape when dynamic)
    lint: bool = True  # TensorRT explicit-quantization rules (see export/lint.py)
    parity_min_cosine: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9999
    threads: Annotated[int, Field(ge=1, le=256)] = 2  # ONNX Runtime intra-op threads for checks
    # an example input that no node of the exported graph reads: "error" (ExportError naming it)
    # or "warn" (exported without it; the result's warnings name it)
    unused_inputs: Literal["error", "warn"] = "error"
    # weight-only models: MatMulNBits' activation precision, 0 or 1 = float32 (what PyTorch
    # computes), 4 = int8 activations in ONNX Runtime's kernel (faster); None: per graph, 0 for
    # the full-sequence graph, 4 for a causal LM's decoder graph (0 when 4 misses the token bar)
    accuracy_level: Literal[0, 1, 4] | None = None


class TensorRTConfig(BaseModel):
    """How to build a TensorRT engine from a (QDQ) ONNX file.

    Shapes for the optimization profile: ``{input: [min, opt, max]}`` per dynamic axis value,
    given as batch and sequence ranges; explicit quantization is implied by Q/DQ nodes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fp16: bool = True
    int8: bool = True
    batch: tuple[int, int, int] = (1, 8, 32)  # min, opt, max
    sequence: tuple[int, int, int] = (8, 64, 128)
    workspace_mib: Annotated[int, Field(ge=16, le=1 << 20)] = 2048
    timing_cache: str | None = None  # path; created when missing, updated after the build
    builder_optimization_level: Annotated[int, Field(ge=0, le=5)] = 3
    strongly_typed: bool = False
    target: Literal["tensorrt"] = "tensorrt"
