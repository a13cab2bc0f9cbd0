"""Export a float or quantized model to one ONNX file, checked against ONNX Runtime.

``export_onnx(model, path, inputs, config) -> OnnxResult``. The model is traced by
``torch.onnx.export(dynamo=True)`` (``torch.export`` underneath) with symbolic batch and sequence
axes; a quantized model (:class:`~slimformer.quantize.state.QuantizedModel`) is exported in its
inference form as standard QDQ (see :mod:`slimformer.export.qdq`); a weight-only one as its float
graph with ONNX Runtime's ``MatMulNBits`` holding our codes (:mod:`slimformer.export.nbits`; a
decoder graph with a KV cache is :mod:`slimformer.export.decoder`). Every output of the model is a
graph output named by its path (:func:`slimformer.models.outputs.leaves`: ``logits``,
``text_embeds``, ``vision_model_output.pooler_output``, ``0``, ...), and every example input must
be read by the graph (else :class:`ExportError`, or a note with ``OnnxConfig.unused_inputs``).
The file is written only after ``onnx.checker`` and the ONNX Runtime parity check of every output
pass (at the traced shape and at a second one); nothing is left behind on failure.

``OnnxConfig.target`` (and ``isa``) choose the QDQ form and opset
(:func:`slimformer.export.targets.resolve_form`); the target, ISA and form are written to the
file's ``metadata_props`` (``slimformer.target``, ...) and to :attr:`OnnxResult.form`, and
quantize settings that run slowly on the target are named in :attr:`OnnxResult.warnings`.
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
from slimformer.export.config import DEFAULT_ACCURACY_LEVEL, OnnxConfig

TWO_GB = 2**31
EXTERNAL_DATA_BYTES = TWO_GB  # above this the weights go to one ``<file>.onnx.data`` beside it


@dataclass
class OnnxResult:
    """A written ONNX file and what was checked about it (``path`` None: a removed temporary)."""

    path: Path | None
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
    form: dict = field(default_factory=dict)  # targets.QdqForm.as_dict()
    ops: dict[str, int] = field(default_factory=dict)  # standard ops of note: Attention, ...

    def summary(self) -> dict:
        """JSON-ready summary for reports."""
        return {"path": str(self.path) if self.path else None, "opset": self.opset,
                "quantized": self.quantized,
                "inputs": self.inputs, "size_bytes": self.size_bytes, "parity": self.parity,
                "fusion": self.fusion, "lint": [f.as_dict() for f in self.lint],
                "warnings": self.warnings, "seconds": round(self.seconds, 2), "form": self.form,
                "ops": self.ops}


class _Entry(nn.Module):
    """Positional entry point ``forward(*inputs) -> (every output tensor)`` for the exporter.

    The outputs are :func:`~slimformer.models.outputs.leaves` of the model's output, in order;
    ``explicit_attention``: ``scaled_dot_product_attention`` is computed as MatMul/Softmax/MatMul
    (the same math), for models whose fused attention the exporter cannot decompose (e.g. T5).
    """

    def __init__(self, model: nn.Module, names: list[str], explicit_attention: bool = False):
        super().__init__()
        self.model, self.names, self.explicit_attention = model, names, explicit_attention
        self.out_names: list[str] = []

    def forward(self, *args):
        """``tuple(leaves(model(**dict(zip(names, args)))).values())``."""
        from slimformer.models.outputs import leaves

        kwargs = dict(zip(self.names, args, strict=True))
        if self.explicit_attention:
            with _ExplicitAttention():
                return tuple(leaves(self.model(**kwargs)).values())
        return tuple(leaves(self.model(**kwargs)).values())


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

    When the target chose opset 23 (no ``opset`` given) and ONNX Runtime cannot run that graph
    (e.g. its ``RotaryEmbedding`` kernel rejects the cos/sin caches torch.onnx writes for rotary
    decoders), the model is exported again at opset 20 and a warning says why.

    Args:
        model: a float module or a quantized model (simulated or inference form).
        path: the ``.onnx`` file; its folder must exist.
        inputs: ``{name: (B, ...)}`` example inputs (real rows are best: they drive the check).
        config: :class:`OnnxConfig`.

    Raises:
        ExportError: the model cannot be exported, or ONNX Runtime cannot run the export.
    """
    from slimformer.errors import SlimformerError
    from slimformer.quantize.state import QuantizedModel

    config = config or OnnxConfig()
    if isinstance(model, QuantizedModel) and getattr(model.quant, "weight_only", False):
        return _weight_only(model, Path(path), inputs, config)
    try:
        return _export_once(model, path, inputs, config)
    except SlimformerError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime and the exporter raise their own types
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        auto = config.opset is None and _form(config, model).opset >= 23
        if not auto:
            raise ExportError(f"exporting or running the ONNX graph failed ({why}); try another "
                              "opset (--opset 20) or target") from exc
        res = _export_once(model, path, inputs, config.model_copy(update={"opset": 20}))
        res.warnings.insert(0, f"opset 23 failed in ONNX Runtime ({why}): exported at opset 20")
        return res


def _form(config: OnnxConfig, model: nn.Module):
    """The :class:`~slimformer.export.targets.QdqForm` ``model`` is exported in under ``config``."""
    from slimformer.export.targets import resolve_form
    from slimformer.quantize.state import QuantizedModel

    quantized = isinstance(model, QuantizedModel)
    return resolve_form(config, quantized,
                        quantized_attention=quantized and model.quant.quantized_attention)


def _export_once(model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor],
                 config: OnnxConfig) -> OnnxResult:
    import onnx

    from slimformer.export.targets import model_settings, slow_settings
    from slimformer.quantize.state import QuantizedModel
    from slimformer.store.atomic import atomic_path

    quantized = isinstance(model, QuantizedModel)
    form = _form(config, model)
    config = config.model_copy(update={"opset": form.opset})
    t0 = time.perf_counter()
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"{path}: the output file must end in .onnx")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: folder {path.parent} does not exist (create it first)")
    if not inputs:
        raise ExportError("no example inputs: pass {name: tensor} with a batch axis first")
    reference = model
    if quantized and not model.inference:
        from slimformer.quantize.inference import to_inference

        reference = to_inference(model)
    notes: list[str] = []
    if quantized:
        from slimformer.export.qdq import QdqModel

        target = QdqModel(reference, form)
        notes += [f"slow on target {form.target}: {w}" for w in
                  slow_settings(form, **model_settings(reference))]
        split = sum(w.outlier_idx is not None for w in target.weights.values())
        if split:
            notes.append(f"outlier channels: {split} Linear(s) add their outlier input channels' "
                         "product in float (a Gather, a float MatMul and an Add each; MiniLM batch "
                         "32, AMD EPYC: 13% slower in ONNX Runtime, 23% in OpenVINO, for +0.008 / "
                         "+0.03 agreement); QuantConfig.outlier_channels: 0 is the faster setting")
        if form.float_attention:
            notes.append(f"opset {form.opset}: scaled_dot_product_attention exported as the float "
                         "standard Attention op (its q/k/v and probability quantizers are not "
                         "applied); parity is against the QDQ model in PyTorch")
            reference = target
    else:
        target = model
    entry = _Entry(target, list(inputs)).eval()
    args = tuple(inputs.values())
    entry.out_names = out_names = _output_names(target, inputs)
    big = _param_bytes(model) > EXTERNAL_DATA_BYTES
    dyn = dynamic_axes_of(inputs) if config.dynamic else {}
    with atomic_path(path) as tmp:
        try:
            proto, dyn = _export_with_fallback(entry, args, list(inputs), dyn, tmp, config, big,
                                               notes)
            _check_graph_io(proto, list(inputs), out_names, config, notes, tmp)
            if config.check:
                onnx.checker.check_model(str(tmp) if big else proto, full_check=True)
            if form.target == "ort-cpu" and config.opset >= 23 and not big:
                from slimformer.export.ortmha import to_ort_mha

                if to_ort_mha(proto):  # ORT's own quantize_dynamic can read this one
                    onnx.save(proto, str(tmp))
            result = OnnxResult(path=path, opset=config.opset, quantized=quantized,
                                inputs=_input_shapes(proto), dynamic_axes=dyn,
                                size_bytes=_file_bytes(tmp), warnings=notes, form=form.as_dict())
            if config.check:
                proto = _verify(result, proto, entry, args, inputs, reference, tmp, config, big,
                                _full_range_int8(reference if not form.float_attention else
                                                 target.qmodel, form) if quantized else False)
            if config.lint:
                from slimformer.export.lint import lint_qdq

                result.lint = lint_qdq(proto)
            result.ops = _ops_of_note(proto)
            _write_metadata(tmp, form)
            result.size_bytes = _file_bytes(tmp)
            if big:
                _move_external(tmp, path)
        except BaseException:
            for f in tmp.parent.glob(tmp.name + ".*"):  # external data of a failed export
                f.unlink(missing_ok=True)
            raise
    result.seconds = time.perf_counter() - t0
    return result


def _weight_only(model, path: Path, inputs: dict[str, torch.Tensor],
                 config: OnnxConfig) -> OnnxResult:
    """A weight-only model: its float graph, each quantized Linear a ``MatMulNBits``.

    The float model is exported (and checked) first; :func:`slimformer.export.nbits.
    to_matmul_nbits` then puts our codes and scales in place of its weights, and ONNX Runtime must
    match the quantized model in PyTorch (``parity_min_cosine``); else :class:`ExportError` and
    no file.
    """
    import onnx

    from slimformer.export.nbits import check_supported, to_matmul_nbits
    from slimformer.export.parity import check_parity
    from slimformer.store.atomic import atomic_path

    check_supported(model)
    res = export_onnx(model.model, path, inputs, config)
    data = path.with_name(path.name + ".data")
    try:
        proto = onnx.load(str(path))
        level = DEFAULT_ACCURACY_LEVEL if config.accuracy_level is None else config.accuracy_level
        stats = to_matmul_nbits(proto, model, level)
        with atomic_path(path) as tmp:
            if data.exists():
                onnx.save(proto, str(tmp), save_as_external_data=True, location=tmp.name + ".data")
            else:
                onnx.save(proto, str(tmp))
            if config.check:
                res.parity, res.fusion = check_parity(model, tmp, inputs, res.dynamic_axes, True,
                                                      config)
                worst = min(p["cosine"] for p in res.parity.values())
                if worst < config.parity_min_cosine:
                    raise ExportError(f"ONNX Runtime's MatMulNBits graph differs from the "
                                      f"weight-only model in PyTorch (cosine {worst:.6f} < "
                                      f"{config.parity_min_cosine})")
            if data.exists():
                data.unlink()
                _move_external(tmp, path)
    except BaseException:
        path.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        raise
    res.quantized, res.size_bytes, res.ops = True, _file_bytes(path), _ops_of_note(proto)
    res.form = {"weights": "MatMulNBits", **stats.by_form}
    res.warnings.append(f"weight-only: {stats.replaced} Linears as com.microsoft::MatMulNBits "
                        f"({', '.join(f'{k}: {v}' for k, v in stats.by_form.items())}), float "
                        "activations; runs in ONNX Runtime only")
    return res


def _full_range_int8(qmodel, form) -> bool:
    """Whether the export holds int8 weights or activations beyond +-64 (8-bit int8 grids)."""
    symmetric = bool(getattr(qmodel.config, "symmetric", False))
    eight = any(lq.wq.bits == 8 for lq in qmodel.quant.linears.values())
    return form.weights == "int8" and eight or (symmetric and form.weights == "model")


def _write_metadata(tmp: Path, form) -> None:
    """Record the target, ISA and form in the file's ``metadata_props`` (re-saved in place)."""
    import onnx

    proto = onnx.load(str(tmp), load_external_data=False)
    meta = form.metadata()
    kept = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(tmp))


def _ops_of_note(proto) -> dict[str, int]:
    """Counts of the fused attention and norm ops (opset 23 ``Attention``, ORT's ``MultiHeadAttention``)."""
    from collections import Counter

    ops = Counter(n.op_type for n in proto.graph.node)
    return {k: ops[k] for k in ("Attention", "MultiHeadAttention", "RMSNormalization",
                                "LayerNormalization") if ops[k]}


def _verify(result, proto, entry, args, inputs, reference, tmp, config, big, signed=False):
    """Check parity with ONNX Runtime; re-export static if only the traced shape holds.

    A float graph that differs from PyTorch only at the second shape is re-exported with static
    shapes (with a note); :class:`ExportError` if a float export still differs. ``signed``: the
    graph holds full-range int8 (saturating fused kernels on x86 CPUs without VNNI).
    """
    import onnx

    from slimformer.export.parity import check_parity

    quantized, dyn = result.quantized, result.dynamic_axes
    result.parity, result.fusion = check_parity(reference, tmp, inputs, dyn, quantized, config)
    if signed and min(p.get("argmax_agreement", 1.0) for p in result.parity.values()) < 0.99:
        fused = min(p.get("argmax_agreement", 1.0) for p in result.parity.values())
        result.parity, result.fusion = check_parity(reference, tmp, inputs, dyn, quantized, config,
                                                    qdq_fusion=False)
        result.warnings.append(
            f"full-range int8 export: ONNX Runtime's fused int8 kernels on this CPU disagree with "
            f"the graph (argmax agreement {fused:.3f}; int8 products saturate on x86 without "
            "VNNI); parity measured with the Q/DQ fusion off (session option "
            "session.disable_quant_qdq=1). For ONNX Runtime on this CPU export with target "
            "ort-cpu (isa detected) instead")
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
        worse = [f"{k} (cosine {m['cosine']:.6f})" for k, m in p["outputs"].items()
                 if m["cosine"] < config.parity_min_cosine]
        raise ExportError(f"ONNX Runtime differs from PyTorch at the {bad[0]} shape "
                          f"{p['shape']} on output {', '.join(worse)}; the float export must "
                          f"reach cosine {config.parity_min_cosine} on every output")
    return proto


def _output_names(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[str]:
    """The names of the model's outputs (one seeded forward); :class:`ExportError` if none."""
    from slimformer.models.outputs import leaves, seeded_forward

    try:
        with torch.no_grad():
            out = seeded_forward(model, inputs)
    except Exception as exc:  # noqa: BLE001 - whatever the forward raises on these inputs
        raise ExportError(f"the model cannot be traced with inputs {list(inputs)}: its forward "
                          f"raised {type(exc).__name__}: {_first_line(exc)}") from exc
    names = list(leaves(out))
    if not names:
        raise ExportError(f"the model returns no tensor (a {type(out).__name__}); the export "
                          "needs at least one output tensor")
    return names


def _graph_reads(graph) -> set[str]:
    """Every value name a node of ``graph`` (or of a subgraph) reads, and the graph outputs."""
    import onnx

    read = {o.name for o in graph.output}
    for n in graph.node:
        read.update(n.input)
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in subs:
                read |= _graph_reads(g)
    return read


def _check_graph_io(proto, in_names: list[str], out_names: list[str], config, notes,
                    tmp: Path) -> None:
    """Every model output is a graph output (same names, same order); every input is read.

    An example input that no node reads is an :class:`ExportError` naming it, or with
    ``config.unused_inputs == "warn"`` a note, and the input leaves the graph (file re-saved).
    """
    import onnx

    got = [o.name for o in proto.graph.output]
    if got != out_names:
        raise ExportError(f"the exported graph's outputs {got} are not the model's {out_names}")
    read = _graph_reads(proto.graph)
    graph_inputs = {i.name for i in proto.graph.input}
    unused = [n for n in in_names if n not in graph_inputs or n not in read]
    if not unused:
        return
    it = "them" if len(unused) > 1 else "it"
    what = f"example input{'s' if len(unused) > 1 else ''} {', '.join(unused)}"
    if config.unused_inputs == "error":
        raise ExportError(f"no node of the exported graph reads the {what}: the model's outputs "
                          f"{out_names} do not depend on {it}; leave {it} out of the example "
                          f"inputs, or set OnnxConfig(unused_inputs='warn') to export without {it}")
    kept = [i for i in proto.graph.input if i.name not in unused]
    if len(kept) < len(proto.graph.input):
        del proto.graph.input[:]
        proto.graph.input.extend(kept)
        onnx.save(proto, str(tmp))
    notes.append(f"exported without the {what}: no node of the graph reads {it} "
                 "(unused_inputs='warn')")


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
                                 input_names=names, output_names=entry.out_names, opset_version=
                                 config.opset, external_data=big, optimize=True, verbose=False,
                                 custom_translation_table=_translations())
    if prog is None:
        raise ExportError("torch.onnx.export returned nothing")
    if big:
        prog.save(str(tmp), external_data=True)
        return onnx.load(str(tmp), load_external_data=False)
    prog.save(str(tmp))
    return onnx.load(str(tmp))


def _translations() -> dict | None:
    """ONNX translations of our custom ops, once they exist (integer matmuls of act_dynamic).

    :mod:`slimformer.export.dynamic` registers them when imported (by a QDQ model that holds
    such a matmul); a table naming them is harmless to graphs that do not use them.
    """
    import sys

    mod = sys.modules.get("slimformer.export.dynamic")
    return mod.translations() if mod is not None else None


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

    The exporter's symbols (``s33``) are renamed everywhere (distinct symbols stay distinct:
    ``sequence``, ``sequence_2``, e.g. an encoder's and a decoder's lengths); the metadata
    (source stack traces) is most of a small model's file.
    """
    import onnx

    for n in proto.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
    rename: dict[str, str] = {}
    for i in proto.graph.input:
        dims = i.type.tensor_type.shape.dim
        for ax in dyn.get(i.name, []):
            if ax < len(dims) and dims[ax].dim_param and dims[ax].dim_param not in rename:
                base = "batch" if ax == 0 else "sequence"
                used = set(rename.values())  # distinct symbols keep distinct names
                rename[dims[ax].dim_param] = next(n for k in range(len(rename) + 1) if
                                                  (n := base if k == 0 else f"{base}_{k + 1}")
                                                  not in used)
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
