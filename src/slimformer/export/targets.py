"""Deployment targets: which QDQ form an export writes, and which quantize settings run slowly.

The values of a quantized model are fixed by its quantizers; the *form* only chooses how the same
values are stored, so that the target's fast integer kernels apply:

- ``weights``: ``int8`` (every weight ``int8``: asymmetric codes shifted by ``2^(b-1)`` with the
  zero point shifted alike; ONNX Runtime's u8 x s8 VNNI/AMX kernels, exact), ``narrow`` (``int8``
  only for <= 7-bit weights, which stay within +-64 so that AVX2's saturating ``vpmaddubsw`` u8 x s8
  kernels are exact; 8-bit weights ``uint8``, symmetric ones with zero point 128), or ``model``
  (symmetric grids ``int8`` zero point 0, asymmetric ``uint8`` at 8 bits / ``int8`` below);
- ``activations``: ``uint8`` (symmetric grids as ``uint8`` with zero point ``2^(b-1)``: ONNX
  Runtime's x86 kernels want unsigned activations) or ``model`` (symmetric grids ``int8``);
- ``opset`` and ``float_attention``: at opset 23 (where supported) ``scaled_dot_product_attention``
  is the standard ``Attention`` op, in float, with Q/DQ on the Linear inputs and weights around it.

Forms per target (measured, GUIDE.md s6): ``ort-cpu`` on ``amx``/``vnni``: int8 weights, uint8
activations; on ``avx2``/``other``: narrow weights, uint8 activations; ``openvino``: the model's
grids (symmetric int8 is the fast form there), opset 23 (attention whose quantizers are all float
is the standard op, which OpenVINO fuses); ``tensorrt``: the model's grids (symmetric required),
opset 20; ``portable``: the model's grids, opset 20. ``ort-cpu`` files at opset 23 carry ONNX
Runtime's ``MultiHeadAttention`` in place of the standard op (:mod:`slimformer.export.ortmha`).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from slimformer.errors import ExportError

FALLBACK_OPSET = 20
METADATA_PREFIX = "slimformer."


@dataclass(frozen=True)
class CpuInfo:
    """The CPU model name and its ISA flags (``/proc/cpuinfo``)."""

    model: str
    flags: frozenset[str]

    @property
    def isa(self) -> str:
        """:func:`isa_of` the flags."""
        return isa_of(self.flags)

    @property
    def bf16(self) -> bool:
        """Native bf16 arithmetic (AVX-512 BF16 or AMX-BF16)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    def line(self) -> str:
        """``model; isa ...; int8/bf16 flags present``: one line to print beside a figure."""
        keys = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
        return f"{self.model}; isa {self.isa}; flags {' '.join(k for k in keys if k in self.flags)}"


def parse_cpuinfo(text: str) -> CpuInfo:
    """A :class:`CpuInfo` from the text of ``/proc/cpuinfo`` (or ``lscpu``: ``Flags:`` lines)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuInfo(model or platform.processor() or "unknown CPU", frozenset(flags))


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (empty flags where ``/proc/cpuinfo`` cannot be read)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return CpuInfo(platform.processor() or "unknown CPU", frozenset())


def isa_of(flags) -> str:
    """The int8 ISA class of a CPU from its flags (a set or a space-separated string).

    ``amx`` (``amx_int8``), ``vnni`` (``avx512_vnni`` or ``avx_vnni``: non-saturating u8 x s8 dot
    products), ``avx2`` (``vpmaddubsw``, whose int16 pair sums saturate beyond +-64 weights), else
    ``other``.
    """
    flags = set(flags.split()) if isinstance(flags, str) else set(flags)
    if "amx_int8" in flags:
        return "amx"
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "vnni"
    if "avx2" in flags:
        return "avx2"
    return "other"


@functools.cache
def opset23_supported() -> bool:
    """Whether the installed onnx and ONNX Runtime build and run an opset-23 ``Attention`` node."""
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        if onnx.defs.onnx_opset_version() < 23:
            return False
        t = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 3, 4]) for n in "qkvy"]
        node = helper.make_node("Attention", ["q", "k", "v"], ["y"])
        graph = helper.make_graph([node], "probe", t[:3], t[3:])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
        proto.ir_version = min(proto.ir_version, 11)
        onnx.checker.check_model(proto)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.ones((1, 2, 3, 4), np.float32)
        out = sess.run(None, {"q": x, "k": x, "v": x})[0]
        return bool(np.allclose(out, x))
    except Exception:  # noqa: BLE001 - any failure means: not supported here
        return False


@dataclass(frozen=True)
class QdqForm:
    """How an export stores a model for its target (see module doc)."""

    target: str  # resolved: ort-cpu / openvino / tensorrt / portable
    isa: str | None  # ort-cpu only: amx / vnni / avx2 / other
    isa_source: str | None  # "detected (<cpu line>)" or "named"
    opset: int
    weights: str  # int8 / narrow / model
    activations: str  # uint8 / model
    float_attention: bool  # scaled_dot_product_attention as a float standard Attention op

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    def metadata(self) -> dict[str, str]:
        """``metadata_props`` entries recorded in the ONNX file."""
        return {f"{METADATA_PREFIX}{k}": str(v) for k, v in self.as_dict().items()}


def resolve_form(config, quantized: bool, cpu: CpuInfo | None = None,
                 quantized_attention: bool = False) -> QdqForm:
    """The form of an export under ``config`` (:class:`~slimformer.export.config.OnnxConfig`).

    Args:
        config: the export config (``target``, ``isa``, ``opset``).
        quantized: whether a quantized model is exported (float exports differ only in opset).
        cpu: the CPU to detect the ISA from (default: this machine's).
        quantized_attention: whether some attention site of the model is quantized (the
            ``openvino`` target then keeps opset 20, whose signed Q/DQ torch.onnx writes right).
    """
    target = "ort-cpu" if config.target == "auto" else config.target
    isa = source = None
    if target == "ort-cpu":
        if config.isa == "auto":
            cpu = cpu or cpu_info()
            isa, source = cpu.isa, f"detected ({cpu.line()})"
        else:
            isa, source = config.isa, "named"
    elif config.isa != "auto":
        raise ExportError(f"isa={config.isa!r} applies to target 'ort-cpu' only (target is "
                          f"{target!r}); leave isa at 'auto'")
    # ort-cpu: opset 23 (standard Attention) for float and quantized models alike. MiniLM batch
    # 32, Intel Xeon AMX, 2026-12-02: float 1.27x over opset 20; quantized W8A8 305 ms vs 374 ms
    # at opset 20 (2.08x vs 1.70x of ORT float o20): attention runs in float there, between the
    # Q/DQ'd Linears, so the probability quantizer is not exported. A model without
    # scaled_dot_product_attention exports the same graph at either opset.
    # openvino: opset 23 too: OpenVINO 2026.4 reads the float Attention op into one fused
    # attention subgraph (MiniLM batch 32, AMD EPYC AVX-512: 48 ms of 191 profiled, against
    # ~100 ms for the opset-20 MatMul / Softmax / Select decomposition, 2026-12-07)
    # (torch.onnx 2.14 writes an attention's signed int8 QuantizeLinear at opset 23 with a
    # uint8 zero point, which ONNX Runtime refuses: quantized attention stays at opset 20)
    fused = target == "ort-cpu" or (target == "openvino" and not quantized_attention)
    default = 23 if fused and opset23_supported() else FALLBACK_OPSET
    opset = config.opset or default
    if opset >= 23 and not opset23_supported():
        raise ExportError(f"opset {opset} needs onnx and onnxruntime that run the standard "
                          "Attention op (opset 23); the installed ones do not: choose opset <= 22")
    if target == "ort-cpu":
        weights = "int8" if isa in ("amx", "vnni") else "narrow"
        activations = "uint8"
    else:
        weights, activations = "model", "model"
    return QdqForm(target=target, isa=isa, isa_source=source, opset=opset, weights=weights,
                   activations=activations,
                   float_attention=quantized and opset >= 23 and target == "ort-cpu")


def model_settings(qmodel) -> dict:
    """What a quantized model's export speed depends on: softmax kinds, symmetric, weight bits."""
    from slimformer.quantize.act import ProbQuantizer

    q = qmodel.quant
    kinds = sorted({m.kind for m in q.modules() if isinstance(m, ProbQuantizer)
                    and m.mode == "quant"})
    return {"softmax": kinds, "symmetric": bool(getattr(qmodel.config, "symmetric", False)),
            "weight_bits": sorted({lq.wq.bits for lq in q.linears.values()})}


def slow_settings(form: QdqForm, softmax: list[str], symmetric: bool,
                  weight_bits: list[int]) -> list[str]:
    """Quantize settings that make the export slow (or wrong) on ``form``'s target, with the fix.

    Args:
        form: the resolved form.
        softmax: the probability quantizer kinds in use (``log_sqrt2``, ``log2``, ``uniform``).
        symmetric: ``QuantConfig.symmetric``.
        weight_bits: the weight bit-widths in use.
    """
    out = []
    logs = [k for k in softmax if k != "uniform"]
    if logs and form.float_attention:
        out.append(f"softmax {'/'.join(logs)}: at opset {form.opset} attention runs in float "
                   "(standard Attention op), so the probability quantizer is not exported")
    elif logs:
        out.append(f"softmax {'/'.join(logs)} (QuantConfig.softmax; 'auto' picks it for repq): "
                   f"target {form.target} has no integer kernel for log-domain probabilities; they "
                   "export as a float Log/Pow/Where chain and two float matmuls per attention "
                   "(measured 3x slower than float in ONNX Runtime); set softmax: uniform")
    if form.target == "openvino" and not symmetric:
        out.append("symmetric: false (QuantConfig.symmetric): OpenVINO runs asymmetric weights "
                   "slowly (measured 351-450 ms vs 84 ms symmetric, MiniLM batch 32); set "
                   "symmetric: true")
    if form.target == "tensorrt" and not symmetric:
        out.append("symmetric: false (QuantConfig.symmetric): TensorRT's explicit quantization "
                   "needs int8 with zero point 0; set symmetric: true")
    if form.target == "ort-cpu" and form.weights == "narrow" and 8 in weight_bits:
        out.append(f"weight_bits 8 on an {form.isa} CPU (no VNNI): 8-bit weights run in u8 x u8 "
                   "kernels (int8 would saturate); weight_bits: 7 stores int8 within +-64 for the "
                   "u8 x s8 kernels (measured 1.39x vs 1.25x of float on AVX2)")
    return out


def config_slow_settings(quant_config, onnx_config) -> list[str]:
    """:func:`slow_settings` of a quantize config before quantizing (e.g. a recipe's stages)."""
    form = resolve_form(onnx_config, quantized=True)
    kinds = [] if quant_config.softmax_kind == "none" else [quant_config.softmax_kind]
    bits = {quant_config.weight_bits, *(o.weight_bits for o in quant_config.overrides
                                        if getattr(o, "weight_bits", None))}
    return slow_settings(form, kinds, quant_config.symmetric, sorted(bits))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``slimformer.*`` metadata of an ONNX file (prefix stripped)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key.removeprefix(METADATA_PREFIX): p.value for p in proto.metadata_props
            if p.key.startswith(METADATA_PREFIX)}
