"""QDQ lint: TensorRT's documented rules for explicitly quantized ONNX models.

TensorRT builds an INT8 engine from Q/DQ nodes exactly where they are ("explicit quantization"),
so a placement it cannot fuse runs as separate scale kernels or in float, and a form it does not
support fails the build. The rules below encode the TensorRT developer guide ("Explicit
Quantization", "Q/DQ Layer-Placement Recommendations", "Q/DQ Limitations"); each finding names the
node. Severity ``error``: the engine build fails or the Q/DQ is rejected; ``warning``: the engine
builds but the part runs unfused (the usual cause of INT8 engines slower than FP16); ``info``:
worth knowing.

| rule | severity | what |
|---|---|---|
| TRT001 | error | zero point not 0: TensorRT quantization is symmetric only |
| TRT002 | error | Q/DQ type other than INT8/FP8/INT4 (e.g. UINT8) |
| TRT003 | error | per-channel quantization of an activation (only weights may be per channel) |
| TRT004 | warning | a weight's per-channel axis is not its output-channel axis |
| TRT005 | error | a QuantizeLinear whose output feeds something other than DequantizeLinear |
| TRT006 | warning | a MatMul/Gemm/Conv with one Q/DQ input and one float input: runs in float |
| TRT007 | warning | a DQ feeding no quantizable op (e.g. Softmax, LayerNorm, Div): unfused Q/DQ |
| TRT008 | warning | a weighted op's output quantized (Q right after MatMul/Gemm/Conv): blocks fusions |
| TRT009 | error | opset below 13 with per-axis scales |
| TRT010 | info | float attention-probability path (e.g. log2 softmax in float ops): no INT8 MHA fusion |
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

WEIGHTED = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
# ops TensorRT can run on (or fuse with) INT8 inputs
QUANTIZABLE = WEIGHTED | {"Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool",
                          "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice",
                          "Gather", "Split", "Relu", "Identity", "Resize", "ReduceMean"}
LAYOUT = {"Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze", "Expand", "Slice"}
OK_TYPES = {3: "INT8", 17: "FLOAT8E4M3FN", 22: "INT4"}
TYPE_NAMES = {2: "UINT8", 3: "INT8", 21: "UINT4", 22: "INT4", 17: "FLOAT8E4M3FN"}


@dataclass(frozen=True)
class Finding:
    """One lint finding."""

    rule: str
    severity: str  # error | warning | info
    node: str
    message: str

    def as_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def lint_qdq(model) -> list[Finding]:
    """Check an ``onnx.ModelProto`` (or a path) against TensorRT's Q/DQ rules (module doc)."""
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node):
        return []  # a float model: explicit quantization does not apply
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def value(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            for a in consts[name].attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def is_const(name: str) -> bool:
        return name in inits or name in consts

    out: list[Finding] = []
    seen_types: set[str] = set()
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name = n.name or n.output[0]
        scale = value(n.input[1]) if len(n.input) > 1 else None
        zp = value(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None and np.any(zp.astype(np.int64) != 0):
            out.append(Finding("TRT001", "error", name, "zero point is not 0 "
                               f"(e.g. {int(zp.ravel()[0])}): TensorRT supports symmetric "
                               "quantization only; quantize with symmetric=true"))
        qtype = _qtype(n, zp, inits, producer)
        if qtype is not None and qtype not in OK_TYPES and name not in seen_types:
            out.append(Finding("TRT002", "error", name, f"quantized type "
                               f"{TYPE_NAMES.get(qtype, qtype)}; TensorRT accepts "
                               f"{', '.join(OK_TYPES.values())}"))
        per_axis = scale is not None and scale.size > 1
        if per_axis and opset < 13:
            out.append(Finding("TRT009", "error", name, f"per-axis scales need opset >= 13, "
                               f"model has {opset}"))
        if n.op_type == "QuantizeLinear":
            bad = [c for c in consumers[n.output[0]] if c.op_type != "DequantizeLinear"]
            if bad:
                out.append(Finding("TRT005", "error", name, "QuantizeLinear output feeds "
                                   f"{', '.join(sorted({c.op_type for c in bad}))}; TensorRT "
                                   "needs every Q followed by a DQ"))
            src = producer.get(n.input[0])
            if src is not None and src.op_type in WEIGHTED:
                out.append(Finding("TRT008", "warning", name, f"output of {src.op_type} "
                                   f"{src.name} is quantized; TensorRT recommends Q/DQ on the "
                                   "inputs of weighted ops, not their outputs"))
            if per_axis and not is_const(n.input[0]):
                out.append(Finding("TRT003", "error", name, "per-channel quantization of an "
                                   "activation; TensorRT allows per-channel scales on weights "
                                   "only"))
            continue
        # DequantizeLinear
        weight = is_const(n.input[0]) or (
            n.input[0] in producer and producer[n.input[0]].op_type == "QuantizeLinear"
            and is_const(producer[n.input[0]].input[0]))
        if per_axis and not weight:
            out.append(Finding("TRT003", "error", name, "per-channel dequantization of an "
                               "activation; TensorRT allows per-channel scales on weights only"))
        users = consumers[n.output[0]]
        if per_axis and weight:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            _check_axis(n, name, axis, users, value(n.input[0]), out)
        if users and not any(u.op_type in QUANTIZABLE for u in users):
            kinds = ", ".join(sorted({u.op_type for u in users}))
            out.append(Finding("TRT007", "warning", name, f"dequantized tensor only feeds "
                               f"{kinds}; TensorRT cannot fuse this Q/DQ into an INT8 op and "
                               "runs it as separate scale kernels"))
    for n in g.node:
        if n.op_type not in WEIGHTED:
            continue
        ins = [i for i in n.input[:2] if i]
        dq = [i in producer and producer[i].op_type == "DequantizeLinear" for i in ins]
        if any(dq) and not all(dq):
            floats = [i for i, d in zip(ins, dq, strict=True) if not d]
            out.append(Finding("TRT006", "warning", n.name or n.output[0],
                               f"{n.op_type} has Q/DQ on one input but not on {floats}: it runs "
                               "in float and the Q/DQ only adds rounding"))
    out.extend(_float_attention(g, producer))
    return out


def _qtype(n, zp, inits, producer) -> int | None:
    """The integer type of a Q/DQ: from its zero point, or from a DQ's integer input."""
    if zp is not None:
        return {np.dtype(np.uint8): 2, np.dtype(np.int8): 3}.get(zp.dtype)
    if n.op_type == "DequantizeLinear" and n.input[0] in inits:
        return inits[n.input[0]].data_type
    return 2 if n.op_type == "QuantizeLinear" else None  # ONNX default: uint8


def _check_axis(n, name, axis, users, w, out) -> None:
    rank = w.ndim if w is not None else 2
    axis = axis % rank if rank else axis
    for u in users:
        if u.op_type == "MatMul" and axis != rank - 1 and u.input[1] == n.output[0]:
            out.append(Finding("TRT004", "warning", name, f"MatMul weight quantized per channel "
                               f"on axis {axis}; TensorRT expects the output-channel axis "
                               f"{rank - 1}"))
        elif u.op_type in ("Conv", "ConvTranspose") and axis != (0 if u.op_type == "Conv" else 1):
            out.append(Finding("TRT004", "warning", name, f"{u.op_type} weight quantized on axis "
                               f"{axis}; TensorRT expects the output-channel axis"))


def _float_attention(g, producer) -> list[Finding]:
    """TRT010: MatMuls fed by a Softmax (directly or through float ops) without Q/DQ."""
    out = []
    for n in g.node:
        if n.op_type != "MatMul":
            continue
        for i in n.input[:1]:
            src, hops, compute = producer.get(i), 0, False
            while src is not None and hops < 12 and src.op_type not in ("Softmax",
                                                                          "DequantizeLinear"):
                compute |= src.op_type not in LAYOUT
                src, hops = producer.get(src.input[0]) if src.input else None, hops + 1
            if src is not None and src.op_type == "Softmax" and compute:
                out.append(Finding("TRT010", "info", n.name or n.output[0], "attention "
                                   "probabilities reach this MatMul through float ops (e.g. the "
                                   "log2 softmax quantizer): TensorRT runs it in FP16/FP32 and "
                                   "cannot fuse INT8 multi-head attention here"))
    return out


def load_onnx(path):
    """Read an ONNX file (without external data); a file that is not ONNX is an ExportError."""
    import onnx
    from google.protobuf.message import DecodeError

    from slimformer.errors import ExportError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as exc:
        raise ExportError(f"{path} is not a readable ONNX file ({type(exc).__name__}: "
                          f"{str(exc)[:200]})") from None
    if not proto.opset_import or not proto.graph.node:  # protobuf reads b"" (and more) as empty
        raise ExportError(f"{path} is not an ONNX model (no operator set or no graph nodes: an "
                          "empty file, or another protobuf); give a .onnx file written by an "
                          "exporter")
    return proto


def lint_summary(findings: list, target: str | None) -> str | None:
    """One line for a file whose ``target`` is not TensorRT (None for TensorRT: list them all).

    The lint checks TensorRT's rules only; for ONNX Runtime or OpenVINO files its findings (often
    hundreds: asymmetric uint8 Q/DQ) are no defect, so they are counted, not listed.
    """
    if target == "tensorrt":
        return None
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    return (f"TensorRT QDQ lint: {len(findings)} finding(s) ({errors} error(s), {warnings} "
            f"warning(s)); they matter only for a TensorRT target (this file is for "
            f"{target or 'another runtime'}): `slimformer export lint FILE` lists them")
