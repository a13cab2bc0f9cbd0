"""Brevitas's own ONNX export of a model with Brevitas layers: QCDQ and QONNX, each run and checked.

``export_brevitas(model, qcdq_path, qonnx_path, inputs, config) -> BrevitasExport`` writes two
files with Brevitas 0.12.1's exporters (its TorchScript path, ``dynamo=False``; its dynamo path
cannot trace Brevitas's own assertions):

- QCDQ (``export_onnx_qcdq``): standard ``QuantizeLinear`` -> ``Clip`` (below 8 bits) ->
  ``DequantizeLinear`` around every Brevitas quantizer, any ONNX runtime runs it; checked in ONNX
  Runtime (:func:`slimformer.export.parity.check_parity`, at a second shape when dynamic);
- QONNX (``export_qonnx``): one ``qonnx.custom_op.general::Quant`` node per quantizer (scale, zero
  point and bit-width as inputs), the format FINN and the QONNX tools read; ONNX Runtime cannot run
  it, so it is run by the ``qonnx`` package's executor (``qonnx.core.onnx_exec``, node by node) and
  its Quant nodes are checked against the model's quantizers (bit-widths; each weight's scale and
  zero point, matched by value). Where ``qonnx`` is not installed only that structural check is
  made (a warning says so). Fixed shapes (what FINN and the executor need).

Whatever else the model computes (float modules, and quantizers that are not Brevitas's, e.g.
slimformer's attention and embedding quantizers, RepQ's input affine) is traced as the plain ONNX
ops that compute it (``Round``, ``Clip``, ``Mul``, ...): the same values, but a QONNX tool sees
float arithmetic there, not ``Quant`` nodes; the caller names those parts (``plain``) for the
result. Both files are judged by site parity (:mod:`slimformer.export.siteparity`) at every
checked shape: PyTorch driven by the file's own codes must compute every quantizer's inputs to
within float tolerance of the file's (a fraction of an LSB) and every output to ``min_sqnr_db``,
else :class:`ExportError` naming the file, shape and site or output (and the plain parts, the
first suspects), and neither file is written. End-to-end parity (the file vs the undriven model)
is measured and reported, not judged: in a deep quantized model one rounding tie that the two
runtimes' float sums break differently spreads (minilm-vader W8A8: 24-28 dB on the logits from
one attention-probability code of 393,216 in layer 0).

Brevitas 0.12.1 predates torch 2.14 in two import paths, bridged by :func:`_exporters` (aliases,
nothing else): ``torch.fx._symbolic_trace._is_fx_tracing_flag`` (thread-local since; set to False:
the export uses no fx tracing) and ``torch.onnx._globals`` (moved under
``torch.onnx._internal.torchscript_exporter``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimformer.errors import ExportError
from slimformer.export.config import OnnxConfig

QCDQ_OPSET = 17  # LayerNormalization as one op; per-axis QuantizeLinear needs >= 13
DEFAULT_MIN_SQNR_DB = 45.0  # outputs driven by the file's codes: measured 129-142 dB


@dataclass
class BrevitasExport:
    """The two written files and what was checked about them (see module doc)."""

    qcdq_path: Path
    qonnx_path: Path
    opset: int
    inputs: dict[str, list[int | str]]  # shapes of the QCDQ file's inputs, symbolic axes by name
    parity: dict[str, dict] = field(default_factory=dict)  # {"qcdq"|"qonnx": {shape: metrics}}
    sites: dict[str, dict] = field(default_factory=dict)  # {"qcdq"|"qonnx": {shape: report}}
    vs_artifact: dict = field(default_factory=dict)  # QCDQ in ORT vs the artifact (traced shape)
    qonnx_nodes: dict = field(default_factory=dict)  # Quant nodes: counts, bit-widths, matched
    qcdq_ops: dict[str, int] = field(default_factory=dict)
    plain: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        """JSON-ready summary for reports."""
        return {"qcdq_path": str(self.qcdq_path), "qonnx_path": str(self.qonnx_path),
                "opset": self.opset, "inputs": self.inputs, "parity": self.parity,
                "site_parity": self.sites,
                "vs_artifact": self.vs_artifact, "qonnx_nodes": self.qonnx_nodes,
                "qcdq_ops": self.qcdq_ops, "plain": self.plain, "warnings": self.warnings,
                "sizes": self.sizes, "seconds": round(self.seconds, 2)}


def export_brevitas(model: nn.Module, qcdq_path: str | Path, qonnx_path: str | Path,
                    inputs: dict[str, torch.Tensor], config: OnnxConfig | None = None,
                    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB, plain: list[str] | tuple = (),
                    artifact: nn.Module | None = None) -> BrevitasExport:
    """Write ``model`` as QCDQ and QONNX ONNX files with Brevitas's exporters, and check both.

    Args:
        model: a module with Brevitas quantized layers, called as ``model(**inputs)``.
        qcdq_path: the QCDQ ``.onnx`` file (written only when both files pass).
        qonnx_path: the QONNX ``.onnx`` file (likewise).
        inputs: ``{name: (B, ...)}`` example inputs (real rows: they drive the checks).
        config: ``opset`` (default 17), ``dynamic`` (QCDQ batch / sequence axes; checked at a
            second shape), ``check``, ``threads``.
        min_sqnr_db: the least SQNR of every output vs ``model`` in PyTorch, per file and shape.
        plain: the parts traced as plain ops (named in the result and in a parity error).
        artifact: the model ``model`` was converted from; the QCDQ file is compared with it too
            (reported only: the conversion's own rounding differences are not the export's).

    Raises:
        ExportError: no Brevitas layer, a bad path, an export or run failure, or a file whose
            outputs differ from PyTorch's (see module doc).
    """
    import onnx

    from slimformer.export.onnx import _Entry, _finalize, _output_names, dynamic_axes_of
    from slimformer.store.atomic import atomic_path

    config = config or OnnxConfig()
    t0 = time.perf_counter()
    paths = [Path(qcdq_path), Path(qonnx_path)]
    for p in paths:
        if p.suffix != ".onnx":
            raise ExportError(f"{p}: the output file must end in .onnx")
        if not p.parent.is_dir():
            raise ExportError(f"{p}: folder {p.parent} does not exist (create it first)")
    if not _has_brevitas_layers(model):
        raise ExportError("the model has no Brevitas quantized layer: Brevitas's export writes "
                          "its quantizers only (convert a quantized model with "
                          "slimformer.qat.convert.to_brevitas first)")
    qcdq_fn, qonnx_fn = _exporters()
    opset = config.opset or QCDQ_OPSET
    names = list(inputs)
    entry = _Entry(model, names).eval()
    entry.out_names = out_names = _output_names(model, inputs)
    args = tuple(inputs.values())
    dyn = dynamic_axes_of(inputs) if config.dynamic else {}
    res = BrevitasExport(paths[0], paths[1], opset, {}, plain=list(plain))
    with atomic_path(paths[0]) as tmp_qcdq, atomic_path(paths[1]) as tmp_qonnx, \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"brevitas(\.|$)")  # its forwards' chatter
        _run_exporter(qcdq_fn, entry, args, tmp_qcdq, names, out_names, opset, dyn, "QCDQ",
                      res.plain)
        _run_exporter(qonnx_fn, entry, args, tmp_qonnx, names, out_names, opset, {}, "QONNX",
                      res.plain)
        proto = _finalize(onnx.load(str(tmp_qcdq)), dyn, tmp_qcdq)  # axes named batch, ...
        res.inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                      for i in proto.graph.input}
        res.qcdq_ops = {k: v for k, v in Counter(n.op_type for n in proto.graph.node).items()
                        if k in ("QuantizeLinear", "DequantizeLinear", "Clip")}
        res.qonnx_nodes = quant_nodes(onnx.load(str(tmp_qonnx)), model)
        if config.check:
            onnx.checker.check_model(proto, full_check=True)
            _check(res, model, tmp_qcdq, tmp_qonnx, inputs, dyn, config, min_sqnr_db, artifact)
        res.sizes = {"qcdq": tmp_qcdq.stat().st_size, "qonnx": tmp_qonnx.stat().st_size}
    res.seconds = time.perf_counter() - t0
    return res


def _has_brevitas_layers(model: nn.Module) -> bool:
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return any(isinstance(m, QuantWeightBiasInputOutputLayer) for m in model.modules())


def _exporters():
    """``(export_onnx_qcdq, export_qonnx)`` of Brevitas, importable under torch 2.14 (module doc)."""
    import torch.fx._symbolic_trace as st

    if not hasattr(st, "_is_fx_tracing_flag"):
        st._is_fx_tracing_flag = False
    if "torch.onnx._globals" not in sys.modules:
        try:
            importlib.import_module("torch.onnx._globals")  # torch < 2.14
        except ModuleNotFoundError:
            from torch.onnx._internal.torchscript_exporter import _globals

            sys.modules["torch.onnx._globals"] = _globals
    try:
        import onnxoptimizer  # noqa: F401 - Brevitas's exporters refuse to run without it
    except ModuleNotFoundError as exc:
        raise ExportError("Brevitas's ONNX export needs onnxoptimizer (scripts/install.sh "
                          "installs it: pip install --no-deps onnxoptimizer==0.4.2)") from exc
    from brevitas.export import export_onnx_qcdq, export_qonnx

    for opset in range(QCDQ_OPSET, 21):
        for op, fn in SYMBOLICS.items():
            torch.onnx.register_custom_op_symbolic(op, fn, opset)
    return export_onnx_qcdq, export_qonnx


def _exp2(g, x):
    """``2^x`` as ``Pow(2, x)``: log-domain probability quantizers."""
    return g.op("Pow", g.op("Constant", value_t=torch.tensor(2.0)), x)


def _isneginf(g, x):
    """``x == -inf`` as ``IsInf(x, detect_positive=0)``: masked attention's safe softmax."""
    return g.op("IsInf", x, detect_positive_i=0, detect_negative_i=1)


# ops our quantized forward uses that the TorchScript exporter cannot translate, as exact ONNX
SYMBOLICS = {"aten::exp2": _exp2, "aten::isneginf": _isneginf}


def _run_exporter(fn, entry, args, path: Path, names, out_names, opset, dyn, what: str,
                  plain: list[str]) -> None:
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "brevitas")]
    old = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            fn(entry, args=args, export_path=str(path), dynamo=False, opset_version=opset,
               input_names=names, output_names=out_names, dynamic_axes=dyn or None,
               keep_initializers_as_inputs=False)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        suspects = f"; parts traced as plain ops: {'; '.join(plain)}" if plain else ""
        raise ExportError(f"Brevitas's {what} export failed ({type(exc).__name__}: {line})"
                          f"{suspects}") from exc
    finally:
        for lg, level in zip(loggers, old, strict=True):
            lg.setLevel(level)


def _check(res: BrevitasExport, model, qcdq: Path, qonnx: Path, inputs, dyn, config,
           min_sqnr_db: float, artifact) -> None:
    """Site parity of both files with ``model`` (module doc); :class:`ExportError` if it fails.

    End-to-end parity (every output vs PyTorch, per shape) is measured and reported; the verdict
    is site parity's (:mod:`slimformer.export.siteparity`): PyTorch driven by each file's codes,
    every quantizer site's inputs within tolerance and every driven output to ``min_sqnr_db``.
    """
    import onnx

    from slimformer.export.ortrun import run_all, session
    from slimformer.export.parity import check_parity, compare_all, other_shape, reference_outputs
    from slimformer.export.siteparity import ort_runner, qonnx_runner, site_parity

    res.parity["qcdq"], _ = check_parity(model, qcdq, inputs, dyn, True, config)
    shapes = {"traced": inputs} | ({"other": other_shape(inputs, dyn)} if dyn else {})
    proto = onnx.load(str(qcdq))
    res.sites["qcdq"] = {label: site_parity(model, inp, proto,
                                            ort_runner(proto, inp, config.threads))[0]
                         for label, inp in shapes.items()}
    proto = onnx.load(str(qonnx))
    try:
        import qonnx as _qonnx  # noqa: F401 - the executor
    except ModuleNotFoundError:
        res.warnings.append("the qonnx package is not installed: the QONNX file was checked by "
                            "its Quant nodes only, not run (scripts/install.sh installs qonnx)")
    else:
        report, outs = site_parity(model, inputs, proto, qonnx_runner(proto, inputs, qonnx))
        p = compare_all(reference_outputs(model, inputs), outs)
        p["shape"] = {k: list(v.shape) for k, v in inputs.items()}
        res.parity["qonnx"], res.sites["qonnx"] = {"traced": p}, {"traced": report}
    if artifact is not None:
        res.vs_artifact = compare_all(reference_outputs(artifact, inputs),
                                      run_all(session(qcdq, config.threads), inputs))
    for file, shapes_ in res.sites.items():
        for label, s in shapes_.items():
            shape = res.parity[file][label]["shape"]
            low = [f"{k} ({m['sqnr_db']:.1f} dB)" for k, m in s["driven"]["outputs"].items()
                   if m["sqnr_db"] < min_sqnr_db]
            why = ""
            if s["bad"]:
                b = max(s["bad"], key=lambda b: b["tol_used"])
                why = (f"{len(s['bad'])} quantizer sites compute other inputs from the same codes "
                       f"(worst {b['node']}: {b['max_err_lsb']:.3g} LSB apart on "
                       f"{b['over_tol']} values, {b['tol_used']:.1f}x the float tolerance)")
            elif low:
                why = f"driven by the file's own codes, output {', '.join(low)}"
            if why:
                suspects = (f"; parts traced as plain ops, not Brevitas quantizers: "
                            f"{', '.join(res.plain)}" if res.plain else "")
                raise ExportError(
                    f"the {file.upper()} file differs from the model in PyTorch at the {label} "
                    f"shape {shape}: {why} (at least {min_sqnr_db} dB needed on every output "
                    f"driven by the file's codes){suspects}")


def run_qonnx(path: str | Path, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every output of a QONNX file on ``inputs``, run by qonnx's executor (node by node).

    Raises:
        ModuleNotFoundError: the ``qonnx`` package is not installed.
        ExportError: the executor cannot run the file.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    try:
        mw = ModelWrapper(str(path)).transform(InferShapes())
        feed = {i.name: inputs[i.name].detach().cpu().numpy() for i in mw.graph.input}
        out = execute_onnx(mw, feed)
    except Exception as exc:  # noqa: BLE001 - qonnx and ONNX Runtime raise their own types
        raise ExportError(f"qonnx's executor cannot run {path}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
    return {o.name: out[o.name] for o in mw.graph.output}


def quant_nodes(proto, model: nn.Module) -> dict:
    """The QONNX file's ``Quant`` nodes checked against ``model``'s Brevitas quantizers.

    Every quantized layer in the graph must have its weight under a ``Quant`` node (found by
    value) with its bit-width, scale and zero point, and the input Quant nodes' bit-widths must
    be those of these layers' input quantizers. A layer whose weight is nowhere in the graph
    (its output reaches no model output, e.g. an unused pooler) is counted, not refused.

    Raises:
        ExportError: a quantized weight in the graph without its Quant node, or a quantizer
            exported with other values.
    """
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    nodes = [n for n in proto.graph.node if n.op_type == "Quant"]
    weights, acts = [], Counter()
    for n in nodes:
        x, scale, zero, bits = (consts.get(i) for i in n.input[:4])
        if bits is None or scale is None or zero is None:
            raise ExportError(f"QONNX Quant node {n.name}: its scale, zero point and bit-width "
                              "are not constants")
        if x is not None:
            weights.append((x, scale, zero, int(bits)))
        else:
            acts[int(bits)] += 1
    layers = [m for m in model.modules() if hasattr(m, "quant_weight") and
              getattr(m, "weight_quant", None) is not None and m.weight_quant.is_quant_enabled]
    present, absent = [], 0
    for m in layers:
        qw = m.quant_weight()
        w, s = m.weight.detach().float().numpy(), qw.scale.detach().float().numpy()
        z = qw.zero_point.detach().float().numpy()
        hit = [c for c in weights if c[0].shape == w.shape and np.array_equal(c[0], w)]
        if not hit:
            if any(c.shape in (w.shape, w.T.shape) and (np.array_equal(c, w) or np.array_equal(
                    c, w.T)) for c in consts.values()):
                raise ExportError(f"QONNX file: the weight of a {type(m).__name__} "
                                  f"{tuple(w.shape)} is in the graph without its Quant node")
            absent += 1
            continue
        if not (hit[0][3] == int(qw.bit_width) and np.array_equal(
                hit[0][1].reshape(s.shape), s) and np.array_equal(
                np.broadcast_to(hit[0][2], s.shape), np.broadcast_to(z, s.shape))):
            raise ExportError(f"QONNX file: the weight quantizer of a {type(m).__name__} "
                              f"{tuple(w.shape)} is exported with another scale, zero point or "
                              "bit-width")
        present.append(m)
    want_acts = Counter(int(m.input_quant.bit_width()) for m in present
                        if m.input_quant.is_quant_enabled)
    if acts != want_acts:
        raise ExportError(f"QONNX file: input Quant nodes by bit-width {dict(acts)} are not the "
                          f"model's {dict(want_acts)}")
    return {"quant_nodes": len(nodes), "weights_matched": len(present),
            "layers_not_in_graph": absent,
            "weight_bits": dict(Counter(f"{c[3]}" for c in weights)),
            "input_bits": {str(k): v for k, v in acts.items()}}
