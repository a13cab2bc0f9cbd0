"""Export a float or quantized model to one ONNX file, checked against ONNX Runtime.

``export_onnx(model, path, inputs, config) -> OnnxResult``. The model is traced by
``torch.onnx.export(dynamo=True)`` (``torch.export`` underneath) with symbolic batch and sequence
axes; a quantized model (:class:`~slimformer.quantize.state.QuantizedModel`) is exported in its
inference form as standard QDQ (see :mod:`slimformer.export.qdq`). The file is written only after
``onnx.checker`` and the ONNX Runtime parity check pass (at the traced shape and at a second one);
nothing is left behind on failure.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from slimformer.errors import ExportError
from slimformer.export.config import OnnxConfig

TWO_GB = 2**31
EXTERNAL_DATA_BYTES = TWO_GB  # above this the weights go to one ``<file>.onnx.data`` beside it


@dataclass
class OnnxResult:
    """A written ONNX file and what was checked about it."""

    path: Path
    opset: int
    quantized: bool
    inputs: dict[str, list[int | str]]  # shapes, symbolic axes by name
    dynamic_axes: dict[str, list[int]]
    size_bytes: int
    parity: dict[str, dict[str, float]] = field(default_factory=dict)  # per checked shape
    fusion: dict[str, int] = field(default_factory=dict)  # ONNX Runtime's optimized graph
    lint: list = field(default_factory=list)  # lint.Finding
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        """JSON-ready summary for reports."""
        return {"path": str(self.path), "opset": self.opset, "quantized": self.quantized,
                "inputs": self.inputs, "size_bytes": self.size_bytes, "parity": self.parity,
                "fusion": self.fusion, "lint": [f.as_dict() for f in self.lint],
                "warnings": self.warnings, "seconds": round(self.seconds, 2)}


def primary_output(out) -> torch.Tensor:
    """The tensor a model is judged by: itself, ``.logits``, or the first element/field."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ExportError(f"cannot find the output tensor in a {type(out).__name__}; supported: a "
                      "tensor, an object with .logits, a tuple/ModelOutput whose first item is one")


class _Entry(nn.Module):
    """Positional entry point ``forward(*inputs) -> tensor`` for the exporter.

    ``explicit_attention``: ``scaled_dot_product_attention`` is computed as MatMul/Softmax/MatMul
    (the same math), for models whose fused attention the exporter cannot decompose (e.g. T5).
    """

    def __init__(self, model: nn.Module, names: list[str], explicit_attention: bool = False):
        super().__init__()
        self.model, self.names, self.explicit_attention = model, names, explicit_attention

    def forward(self, *args):
        """``primary_output(model(**dict(zip(names, args))))``."""
        kwargs = dict(zip(self.names, args, strict=True))
        if self.explicit_attention:
            with _ExplicitAttention():
                return primary_output(self.model(**kwargs))
        return primary_output(self.model(**kwargs))


class _Identity:
    """Attention 'quantizers' that change nothing (for :func:`~slimformer.quantize.intercept.sdpa`)."""

    q_in = k_in = quant_probs = staticmethod(lambda x: x)
    pv = staticmethod(lambda p, v, matmul: matmul(p, v))


class _ExplicitAttention(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            from slimformer.quantize.intercept import sdpa

            return sdpa(_Identity, *args, **kwargs)
        return func(*args, **kwargs)


def dynamic_axes_of(inputs: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Axes to make symbolic: batch (0) of every input, sequence (1) of 2-D+ integer inputs."""
    return {k: [0, 1] if (not v.is_floating_point() and v.dim() >= 2) else [0]
            for k, v in inputs.items()}


def export_onnx(model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor],
                config: OnnxConfig | None = None) -> OnnxResult:
    """Write ``model`` to ``path`` as ONNX (QDQ when quantized) and check it.

    Args:
        model: a float module or a quantized model (simulated or inference form).
        path: the ``.onnx`` file; its folder must exist.
        inputs: ``{name: (B, ...)}`` example inputs (real rows are best: they drive the check).
        config: :class:`OnnxConfig`.
    """
    import onnx

    from slimformer.quantize.state import QuantizedModel
    from slimformer.report.io import atomic_path

    config = config or OnnxConfig()
    t0 = time.perf_counter()
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"{path}: the output file must end in .onnx")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: folder {path.parent} does not exist (create it first)")
    if not inputs:
        raise ExportError("no example inputs: pass {name: tensor} with a batch axis first")
    quantized = isinstance(model, QuantizedModel)
    reference = model
    if quantized and not model.inference:
        from slimformer.quantize.inference import to_inference

        reference = to_inference(model)
    if quantized:
        from slimformer.export.qdq import QdqModel

        target = QdqModel(reference)
    else:
        target = model
    entry = _Entry(target, list(inputs)).eval()
    args = tuple(inputs.values())
    big = _param_bytes(model) > EXTERNAL_DATA_BYTES
    notes: list[str] = []
    dyn = dynamic_axes_of(inputs) if config.dynamic else {}
    with atomic_path(path) as tmp:
        try:
            proto, dyn = _export_with_fallback(entry, args, list(inputs), dyn, tmp, config, big,
                                               notes)
            if config.check:
                onnx.checker.check_model(str(tmp) if big else proto, full_check=True)
            result = OnnxResult(path=path, opset=config.opset, quantized=quantized,
                                inputs=_input_shapes(proto), dynamic_axes=dyn,
                                size_bytes=_file_bytes(tmp), warnings=notes)
            if config.check:
                proto = _verify(result, proto, entry, args, inputs, reference, tmp, config, big)
            if config.lint:
                from slimformer.export.lint import lint_qdq

                result.lint = lint_qdq(proto)
            if big:
                _move_external(tmp, path)
        except BaseException:
            for f in tmp.parent.glob(tmp.name + ".*"):  # external data of a failed export
                f.unlink(missing_ok=True)
            raise
    result.seconds = time.perf_counter() - t0
    return result


def _verify(result, proto, entry, args, inputs, reference, tmp, config, big):
    """Check parity with ONNX Runtime; re-export static if only the traced shape holds.

    A float graph that differs from PyTorch only at the second shape is re-exported with static
    shapes (with a note); :class:`ExportError` if a float export still differs.
    """
    import onnx

    from slimformer.export.parity import check_parity

    quantized, dyn = result.quantized, result.dynamic_axes
    signed = quantized and getattr(reference.config, "symmetric", False)
    result.parity, result.fusion = check_parity(reference, tmp, inputs, dyn, quantized, config)
    if signed and min(p.get("argmax_agreement", 1.0) for p in result.parity.values()) < 0.99:
        fused = min(p.get("argmax_agreement", 1.0) for p in result.parity.values())
        result.parity, result.fusion = check_parity(reference, tmp, inputs, dyn, quantized, config,
                                                    qdq_fusion=False)
        result.warnings.append(
            f"symmetric int8 export: ONNX Runtime's fused int8 kernels on this CPU disagree with "
            f"the graph (argmax agreement {fused:.3f}; int8 x int8 products saturate on x86 "
            "without VNNI); parity measured with the Q/DQ fusion off (session option "
            "session.disable_quant_qdq=1). Symmetric exports are for TensorRT; use the default "
            "asymmetric (uint8) form for ONNX Runtime on CPUs")
    bad = [k for k, p in result.parity.items()
           if not quantized and p["cosine"] < config.parity_min_cosine]
    if bad == ["other"]:  # the traced graph holds only at the traced shape
        result.warnings.append(
            f"with symbolic axes ONNX Runtime differed from PyTorch at another shape (cosine "
            f"{result.parity['other']['cosine']:.6f}): the model's code depends on its input "
            "sizes; exported with static shapes")
        proto = _finalize(_export_explicit(entry, args, list(inputs), {}, tmp, config, big,
                                           result.warnings), {}, tmp)
        onnx.checker.check_model(str(tmp) if big else proto, full_check=True)
        result.inputs, result.dynamic_axes = _input_shapes(proto), {}
        result.size_bytes = _file_bytes(tmp)
        result.parity, result.fusion = check_parity(reference, tmp, inputs, {}, quantized, config)
        bad = [k for k, p in result.parity.items() if p["cosine"] < config.parity_min_cosine]
    if bad:
        p = result.parity[bad[0]]
        raise ExportError(f"ONNX Runtime output differs from PyTorch at the {bad[0]} shape "
                          f"{p['shape']}: cosine {p['cosine']:.6f} < {config.parity_min_cosine}")
    return proto


def _export_explicit(entry, args, names, dyn, tmp, config, big, notes):
    """Export; if that fails, once more with attention as explicit MatMul/Softmax."""
    try:
        return _export(entry, args, names, dyn, tmp, config, big)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        if entry.explicit_attention:
            raise
        first = exc
    entry.explicit_attention = True
    try:
        proto = _export(entry, args, names, dyn, tmp, config, big)
    except Exception:
        entry.explicit_attention = False
        raise first from None
    notes.append("scaled_dot_product_attention exported as explicit MatMul/Softmax/MatMul (the "
                 f"fused form failed: {type(first).__name__}: {_first_line(first)})")
    return proto


def _export_with_fallback(entry, args, names, dyn, tmp, config, big, notes):
    """Export with symbolic axes; on failure or a shape-dependent graph, export static shapes."""
    if dyn:
        try:
            proto = _export_explicit(entry, args, names, dyn, tmp, config, big, notes)
            fixed = [f"{n}[{ax}]" for n, axes in dyn.items() for ax in axes
                     if not _is_symbolic(proto, n, ax)]
            if fixed:
                notes.append(f"axes {', '.join(fixed)} were fixed by the model's code (it "
                             "depends on their size): exported with those axes static")
                dyn = {n: [ax for ax in axes if f"{n}[{ax}]" not in fixed] for n, axes in
                       dyn.items()}
                dyn = {n: axes for n, axes in dyn.items() if axes}
            return _finalize(proto, dyn, tmp), dyn
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - any exporter failure: retry with static shapes
            notes.append(f"dynamic axes could not be exported ({type(exc).__name__}: "
                         f"{_first_line(exc)}); exported with the static shapes "
                         f"{ {n: list(a.shape) for n, a in zip(names, args, strict=True)} }")
    try:
        return _finalize(_export_explicit(entry, args, names, {}, tmp, config, big, notes), {},
                         tmp), {}
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - diagnose which op and module could not be exported
        from slimformer.export.diagnose import unsupported_ops

        culprits = unsupported_ops(entry, args)
        if culprits and culprits[0][0].startswith("torch.export: "):
            raise ExportError(f"the model cannot be traced with inputs {names}: "
                              f"{culprits[0][0].removeprefix('torch.export: ')}") from exc
        where = "; ".join(f"{op} in {mod or '<top level>'}" for op, mod in culprits)
        raise ExportError(
            f"ONNX export failed: {where or _first_line(exc)}. "
            + ("These operators have no ONNX translation at opset "
               f"{config.opset}; replace them in the model or keep those modules out of the export."
               if culprits else f"({type(exc).__name__})")) from exc


def _export(entry, args, names, dyn, tmp, config, big):
    import onnx
    from torch.export import Dim

    # forward(*args): the dynamic shapes of the varargs are one tuple
    shapes = (tuple({ax: Dim.AUTO for ax in dyn.get(n, [])} or None for n in names),) if dyn else None
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), _quiet_logs():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(entry, args, dynamo=True, dynamic_shapes=shapes,
                                 input_names=names, output_names=["output"], opset_version=
                                 config.opset, external_data=big, optimize=True, verbose=False)
    if prog is None:
        raise ExportError("torch.onnx.export returned nothing")
    if big:
        prog.save(str(tmp), external_data=True)
        return onnx.load(str(tmp), load_external_data=False)
    prog.save(str(tmp))
    return onnx.load(str(tmp))


@contextlib.contextmanager
def _quiet_logs():
    """Silence the exporters' chatter.

    torch.onnx's progress, and onnxscript's constant folder warning "Evaluation failed: ..." (a
    constant it cannot fold stays a node; the graph is still right).
    """
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, old, strict=True):
            lg.setLevel(level)


def _is_symbolic(proto, name: str, axis: int) -> bool:
    for i in proto.graph.input:
        if i.name == name:
            dims = i.type.tensor_type.shape.dim
            return axis < len(dims) and bool(dims[axis].dim_param)
    return True  # an input the graph dropped (unused) constrains nothing


def _finalize(proto, dyn: dict[str, list[int]], tmp: Path):
    """Name symbolic axes ``batch`` / ``sequence``; drop per-node debug metadata; re-save.

    The exporter's symbols (``s33``) are renamed everywhere; the metadata (source stack traces)
    is most of a small model's file.
    """
    import onnx

    for n in proto.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
    rename = {}
    for i in proto.graph.input:
        dims = i.type.tensor_type.shape.dim
        for ax in dyn.get(i.name, []):
            if ax < len(dims) and dims[ax].dim_param:
                rename.setdefault(dims[ax].dim_param, "batch" if ax == 0 else "sequence")
    if proto.ByteSize() > TWO_GB:
        return proto
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
    onnx.save(proto, str(tmp))
    return proto


def _input_shapes(proto) -> dict[str, list[int | str]]:
    out = {}
    for i in proto.graph.input:
        dims = i.type.tensor_type.shape.dim
        out[i.name] = [d.dim_param if d.dim_param else d.dim_value for d in dims]
    return out


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _file_bytes(p: Path) -> int:
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _move_external(tmp: Path, path: Path) -> None:
    """Point the external tensors at ``<path>.data`` and move the data file there."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    final = path.name + ".data"
    model = onnx.load(str(tmp), load_external_data=False)
    sources = set()
    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    sources.add(e.value)
                    e.value = final
    if len(sources) > 1:
        raise ExportError(f"the exporter wrote {len(sources)} external data files; expected one")
    onnx.save(model, str(tmp))
    for src in sources:
        (tmp.parent / src).replace(path.parent / final)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
