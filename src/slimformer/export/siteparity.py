"""Site parity: an exported quantized graph judged quantizer by quantizer, from identical codes.

End-to-end parity cannot judge a deep quantized model: the runtimes' float sums differ by a few
ulps, an input that sits on a rounding tie then takes the other code, and the model spreads that
one code (measured on minilm-vader W8A8: one attention-probability code of 393,216 in layer 0,
2.3e-6 LSB from a tie, moves the 2 class logits to 24-27 dB and flips 10^5 codes by layer 5).

Here PyTorch runs the model with every quantizer's output replaced by the graph's: the input of
each Brevitas input quantizer by the graph's dequantized value there (``QuantizeLinear`` ->
``(q - z) * s`` in QCDQ, the ``Quant`` node's output in QONNX), and every ``round`` our own
quantizers call outside Brevitas layers (attention q / k / v and probabilities, embedding
tables, RepQ-free plain quantizers; zero points computed in the forward) by the graph's ``Round``
of the same site. Each site then compares the two runtimes' rounding inputs, in LSBs of that
site (``x / s`` for a Brevitas quantizer, the ``Round`` input for ours), from the same upstream
values. A translation that computes something else (another GELU, mask or softmax) moves the
next site's inputs by a fraction of an LSB or more; float reordering moves them by ulps.

Sites are matched in graph (topological) order to the PyTorch calls: Brevitas layers by input
shape, scale and zero point (a layer absent from the graph, e.g. BERT's unused pooler, is
skipped and counted); ``round`` calls by shape. A call that finds no site is not driven.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from slimformer.errors import ExportError

# |PyTorch - graph| rounding input allowed at a site, in LSBs of that site: float reordering
# measured <= 4.7e-4 LSB on minilm-vader (values up to 255 LSB); see docs/export.md for planted
# translation errors
SITE_TOL_LSB = 2e-3
SITE_TOL_REL = 8e-6  # plus this share of |x / s| (~64 float32 ulps: larger values, larger ulps)


def graph_sites(proto) -> tuple[list[dict], list[str]]:
    """The quantizer sites of ``proto`` in graph order and the value names to read there.

    A site is ``{"kind": "brevitas" | "round", "node", "x", "out", "scale", "zero"}``:
    ``QuantizeLinear`` or ``Quant`` with a non-constant input (a Brevitas input quantizer; scale
    and zero point constants) or ``Round`` (our plain quantizers).
    """
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    sites, names = [], []
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "Quant") and n.input[0] not in consts:
            scale, zero = consts.get(n.input[1]), consts.get(n.input[2])
            if scale is None or zero is None or scale.size != 1 or zero.size != 1:
                continue  # not a per-tensor input quantizer with constant grid
            sites.append({"kind": "brevitas", "node": n.name, "op": n.op_type, "x": n.input[0],
                          "out": n.output[0], "scale": np.float32(scale.reshape(())),
                          "zero": np.float32(zero.reshape(()))})
            names += [n.input[0], n.output[0]]
        elif n.op_type == "Round" and n.input[0] not in consts:
            sites.append({"kind": "round", "node": n.name, "x": n.input[0]})
            names.append(n.input[0])
    return sites, list(dict.fromkeys(names))


class _Driver(TorchFunctionMode):
    """Replaces PyTorch's quantizer outputs with the graph's and records each site's inputs."""

    def __init__(self, sites: list[dict], values: dict[str, np.ndarray]):
        super().__init__()
        self.values = values
        self.brevitas = [s for s in sites if s["kind"] == "brevitas"]
        self.rounds = [s for s in sites if s["kind"] == "round"]
        self.bi = self.ri = 0
        self.depth = 0  # > 0 inside a Brevitas layer: its own rounds are not sites
        self.found: list[dict] = []
        self.skipped_layers = self.skipped_rounds = 0
        self._grids: dict[int, tuple[float, float]] = {}

    def _grid(self, proxy) -> tuple[float, float]:
        if id(proxy) not in self._grids:
            with torch.no_grad():
                qt = proxy(torch.zeros(1))
            self._grids[id(proxy)] = (float(qt.scale), float(qt.zero_point))
        return self._grids[id(proxy)]

    def layer_input(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The graph's dequantized input of ``layer`` (a Brevitas layer); None if absent."""
        proxy = layer.input_quant
        if not proxy.is_quant_enabled:
            return None
        self.depth += 1  # the probe's own rounds are no site
        scale, zero = self._grid(proxy)
        self.depth -= 1
        for j in range(self.bi, len(self.brevitas)):
            s = self.brevitas[j]
            gx = self.values[s["x"]]
            if gx.shape == tuple(x.shape) and np.isclose(s["scale"], scale, rtol=1e-6) and \
                    s["zero"] == zero:
                break
        else:
            self.skipped_layers += 1
            return None
        self.bi = j + 1
        out = self.values[s["out"]]
        if s["op"] == "QuantizeLinear":  # codes -> the grid value DequantizeLinear computes
            out = (out.astype(np.float32) - s["zero"]) * s["scale"]
        self.found.append(_site(s, x.detach().cpu().numpy() / s["scale"], gx / s["scale"]))
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth or func not in _ROUNDS or kwargs.get("decimals") or len(args) > 1:
            return func(*args, **kwargs)
        x = args[0]
        if self.ri >= len(self.rounds) or \
                self.values[self.rounds[self.ri]["x"]].shape != tuple(x.shape):
            self.skipped_rounds += 1  # folded into a constant by the exporter, or absent
            return func(*args, **kwargs)
        s = self.rounds[self.ri]
        self.ri += 1
        g = self.values[s["x"]]
        self.found.append(_site(s, x.detach().cpu().numpy(), g))  # (the mode is off in here)
        out = func(*args, **kwargs)  # round_ rounds x in place: read it first
        driven = torch.from_numpy(np.round(g).astype(np.float32)).to(out)
        if func is torch.Tensor.round_:
            return out.copy_(driven)
        return driven


_ROUNDS = (torch.round, torch.Tensor.round, torch.Tensor.round_)


def _site(s: dict, mine: np.ndarray, graph: np.ndarray) -> dict:
    """One site's figures: rounding inputs ``mine`` (PyTorch) vs ``graph``, in LSBs."""
    a, b = mine.astype(np.float64), graph.astype(np.float64)
    err = np.abs(a - b)
    use = err / (SITE_TOL_LSB + SITE_TOL_REL * np.abs(a))  # share of the tolerance used
    codes = np.round(a) != np.round(b)
    sig = float((a * a).sum())
    noise = float(((a - b) ** 2).sum())
    return {"kind": s["kind"], "node": s["node"], "shape": list(a.shape),
            "max_err_lsb": float(err.max()) if err.size else 0.0,
            "over_tol": int((use > 1).sum()), "tol_used": float(use.max()) if use.size else 0.0,
            "codes_differ": int(codes.sum()), "size": int(a.size),
            "sqnr_db": float(10 * np.log10(sig / noise)) if noise > 0 else float("inf")}


@torch.no_grad()
def site_parity(model: nn.Module, inputs: dict[str, torch.Tensor], proto,
                run: Callable[[list[str]], dict[str, np.ndarray]]) -> tuple[dict, dict]:
    """Drive ``model`` with the graph's codes and compare every quantizer site (module doc).

    Args:
        model: the Brevitas model the graph was exported from, called as ``model(**inputs)``.
        inputs: ``{name: (B, ...)}`` the graph's inputs.
        proto: the exported ``onnx.ModelProto``.
        run: runs the graph on ``inputs``, ``{name: array}`` of its outputs and the named values.

    Returns:
        ``(report, graph outputs {name: array})``. ``report``: ``driven`` (:func:`compare_all`
        of the driven model's outputs vs the graph's), ``sites`` / ``graph_sites`` (matched /
        in the graph), ``skipped_layers`` (Brevitas layers absent from the graph),
        ``skipped_rounds``, ``codes_differ`` (rounding ties, summed over sites), ``worst`` (the 3
        sites using most of their tolerance) and ``bad`` (sites with inputs further apart than
        :data:`SITE_TOL_LSB` + :data:`SITE_TOL_REL` ``|x / s|``: a translation error).
    """
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    from slimformer.export.parity import compare_all
    from slimformer.models.outputs import leaves, seeded_forward

    sites, names = graph_sites(proto)
    values = run(names)
    outs = {o.name: values[o.name] for o in proto.graph.output}
    drv = _Driver(sites, values)
    hooks = []

    def pre(layer, args):
        g = drv.layer_input(layer, args[0]) if args else None
        drv.depth += 1
        return None if g is None else (g, *args[1:])

    def post(layer, args, out):
        drv.depth -= 1

    for m in model.modules():
        if isinstance(m, QuantWeightBiasInputOutputLayer):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with drv:
            ref = leaves(seeded_forward(model, inputs))
    finally:
        for h in hooks:
            h.remove()
    ref = {k: v.detach().float().cpu().numpy() for k, v in ref.items()}
    brief = [{k: s[k] for k in ("node", "kind", "max_err_lsb", "tol_used", "over_tol",
                                "codes_differ")} for s in drv.found]
    report = {"driven": compare_all(ref, outs), "sites": len(drv.found),
              "graph_sites": len(sites), "skipped_layers": drv.skipped_layers,
              "skipped_rounds": drv.skipped_rounds,
              "codes_differ": sum(s["codes_differ"] for s in drv.found),
              "worst": sorted(brief, key=lambda s: -s["tol_used"])[:3],
              "bad": [s for s in brief if s["over_tol"]]}
    return report, outs


def ort_runner(proto, inputs: dict[str, torch.Tensor], threads: int = 1):
    """``run`` for :func:`site_parity`: ONNX Runtime (CPU) on ``proto`` with extra outputs."""
    import onnx
    import onnxruntime as ort

    def run(names: list[str]) -> dict[str, np.ndarray]:
        m = onnx.ModelProto()
        m.CopyFrom(proto)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend([onnx.ValueInfoProto(name=n) for n in names if n not in have])
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        sess = ort.InferenceSession(m.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        feed = {i.name: inputs[i.name].detach().cpu().numpy() for i in sess.get_inputs()}
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))

    return run


def qonnx_runner(proto, inputs: dict[str, torch.Tensor], where: object = "the QONNX graph"):
    """``run`` for :func:`site_parity`: qonnx's executor (node by node) on a QONNX ``proto``.

    The run raises :class:`ExportError` naming ``where`` if the executor cannot run the graph.
    """

    def run(names: list[str]) -> dict[str, np.ndarray]:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx
        from qonnx.transformation.infer_shapes import InferShapes

        try:
            mw = ModelWrapper(proto).transform(InferShapes())
            feed = {i.name: inputs[i.name].detach().cpu().numpy() for i in mw.graph.input}
            return execute_onnx(mw, feed, return_full_exec_context=True)
        except Exception as exc:  # noqa: BLE001 - qonnx and ONNX Runtime raise their own types
            line = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise ExportError(f"qonnx's executor cannot run {where}: {type(exc).__name__}: "
                              f"{line}") from exc

    return run
