"""Workarounds for hls4ml 1.3 pitfalls, in one place (GUIDE.md §4).

Each has a test that fails once upstream hls4ml does the right thing itself, so we know when to
drop it.

(a) ``auto`` result precisions give a silently wrong softmax: every precision of every layer is
    set explicitly (:func:`check_no_auto`).
(b) A Linear over a sequence keeps PyTorch's ``(out, in)`` weights when channels-last conversion is
    off: we hand hls4ml ``(in, out)`` weights ourselves (:mod:`.project`) and check them
    (:func:`check_dense_layout`).
(c) Softmax over a 3-D tensor normalizes the whole tensor unless ``n_outer`` / ``n_inner`` are set,
    and the templates read them only when re-run: :func:`fix_softmax_axis`.
(d) The einsum handler reports the input shape as its output shape: our layer list carries the
    einsum output shape (:mod:`.project`), and :func:`check_einsum_shapes` verifies it.
"""

from __future__ import annotations

from slimformer.errors import HardwareError


def fix_softmax_axis(model, graph, prec) -> None:
    """Pitfall (c): set ``n_outer`` / ``n_inner`` of every softmax, then refill its templates.

    Also sets our exp scale and normalized-input type; the templates were filled when the graph
    was built, so they are applied again.
    """
    from types import SimpleNamespace

    for op in graph.ops:
        if op.kind != "softmax":
            continue
        layer = model.graph[op.name]
        layer.set_attr("n_outer", op.attrs["n_outer"])
        layer.set_attr("n_inner", op.attrs["n_inner"])
        layer.set_attr("exp_scale", op.attrs["exp_scale"])
        layer.set_attr("inp_norm_t", SimpleNamespace(name=prec.fixed[op.name]["inp_norm"].hls))
    backend = model.config.get_config_value("Backend").lower()
    model.apply_flow(f"{backend}:apply_templates")


def _hls_type(t):
    from hls4ml.model.types import FixedPrecisionType, RoundingMode, SaturationMode

    return FixedPrecisionType(t.width, t.integer, t.signed,
                              RoundingMode.from_string(t.rounding.removeprefix("AP_")),
                              SaturationMode.from_string(t.saturation.removeprefix("AP_")))


def _ap(precision):
    from hls4ml.backends.fpga.fpga_types import APTypeConverter

    return APTypeConverter().convert(precision)


def set_precisions(model, graph, prec) -> None:
    """Pitfall (a): give every type variable of every layer our precision, explicitly.

    hls4ml's config reads only some of them (``result``, ``weight``, ``bias``, ``accum``);
    the softmax table types stay at their defaults (or ``auto``) otherwise.
    """
    for op in graph.ops:
        if op.name not in model.graph:
            continue
        layer = model.graph[op.name]
        for var, t in prec.fixed[op.name].items():
            attr = layer.get_attr(f"{var}_t")
            if attr is not None and hasattr(attr, "precision"):
                attr.precision = _ap(_hls_type(t))
        if op.kind in ("dense", "layernorm", "add_const", "scale"):
            for var in ("weight", "bias", "scale"):
                w = layer.weights.get(var) if hasattr(layer, "weights") else None
                if w is not None and var in prec.fixed[op.name]:
                    w.type.precision = _ap(_hls_type(prec.fixed[op.name][var]))


def check_no_auto(model) -> None:
    """Pitfall (a): no variable of any layer may be left at an ``auto`` precision."""
    from hls4ml.model.types import UnspecifiedPrecisionType

    left = []
    for layer in model.get_layers():
        for var, t in layer.attributes.items():
            if isinstance(getattr(t, "precision", None), UnspecifiedPrecisionType):
                left.append(f"{layer.name}.{var}")
    if left:
        raise HardwareError("hls4ml left these precisions at 'auto', which gives wrong results "
                            "(softmax): " + ", ".join(left))


def check_einsum_shapes(model, graph) -> None:
    """Pitfall (d): every einsum's output variable has the einsum's output shape."""
    for op in graph.ops:
        if op.kind == "einsum":
            shape = list(model.graph[op.name].get_output_variable().shape)
            if [d for d in shape if d != 1] != [d for d in op.shape if d != 1]:
                raise HardwareError(f"hls4ml einsum {op.name}: output shape {shape}, "
                                    f"expected {list(op.shape)}")


def check_dense_layout(model, graph, prec) -> None:
    """Pitfall (b): every Dense / pointwise layer holds our weights in ``(in, out)`` layout."""
    import numpy as np

    for op in graph.ops:
        if op.kind == "dense" and op.name in model.graph:
            w = np.asarray(model.graph[op.name].get_weights("weight").data)
            want = prec.weights[op.name].numpy().T  # (in, out)
            if w.size != want.size or not np.allclose(w.reshape(want.shape), want):
                raise HardwareError(f"hls4ml layer {op.name}: weights not in (in, out) layout")


def apply(model, graph, prec) -> None:
    """All workarounds, after the ModelGraph is built and before it is written."""
    set_precisions(model, graph, prec)
    fix_softmax_axis(model, graph, prec)
    check_no_auto(model)
    check_einsum_shapes(model, graph)
    check_dense_layout(model, graph, prec)
