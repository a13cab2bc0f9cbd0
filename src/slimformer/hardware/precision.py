"""Fixed-point types of every tensor of an :class:`~.graph.HlsGraph`, from our quantization.

Where our quantizer rounds a tensor (a Linear's input, the attention matmul inputs, quantized
attention probabilities), its grid ``s * (q - z)`` with a power-of-two ``s`` *is* an
``ap_fixed<W, I>``: the type of that tensor. Weights quantized per output channel with
power-of-two scales sit on the grid of the finest channel, so the layer's weight type holds them
exactly. (The type holds every grid value; a value beyond the calibrated range saturates at
the type's bound, which for an asymmetric grid lies up to one grid range further out than the
quantizer's clamp.) Tensors our quantization leaves in float (residual stream, scores, LayerNorm outputs
that feed no Linear) get ``free_frac_bits`` fractional bits and the integer bits their calibration
range needs. Accumulators keep every product bit (exact) unless ``accum_frac_bits`` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from slimformer.errors import HardwareError
from slimformer.hardware.config import HlsConfig
from slimformer.hardware.fixed import FixedType, fixed_for_range, grid_type
from slimformer.hardware.graph import HlsGraph, Op, contraction_size, run_float

_TRANSPARENT = ("reshape", "transpose")
MARGIN = 1.25  # calibration ranges are widened by this factor


@dataclass
class Precisions:
    """Types per operation (``types[op][var]`` as hls4ml strings, ``fixed`` as FixedType)."""

    fixed: dict[str, dict[str, FixedType]] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # (out, in), on their grid
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    ln_eps_power: dict[str, int] = field(default_factory=dict)
    ln_range_power2: dict[str, int] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # op -> where its result type comes from
    notes: list[str] = field(default_factory=list)

    @property
    def types(self) -> dict[str, dict[str, str]]:
        """hls4ml precision strings per operation and variable."""
        return {op: {v: t.hls4ml for v, t in d.items()} for op, d in self.fixed.items()}

    def result(self, op: str) -> FixedType:
        """The result type of ``op``."""
        return self.fixed[op]["result"]


def _is_pow2(t: torch.Tensor) -> bool:
    e = torch.log2(t.double())
    return bool(torch.all((e - e.round()).abs() < 1e-9))


def _act_type(act, what: str) -> FixedType:
    """The exact type of an activation quantizer's grid (power-of-two scale required)."""
    if getattr(act, "shift", None) is not None:
        raise HardwareError(f"{what}: its quantizer keeps a per-channel affine on the quantized "
                            "branch (repq after an activation or on a post-norm model), which "
                            "hls4ml cannot apply; use method minmax or percentile for FPGA targets")
    if getattr(act, "rot_signs", None) is not None:
        raise HardwareError(f"{what}: its quantizer rotates its input online (rotate_inputs: a "
                            "float orthogonal matmul before the grid), which hls4ml does not "
                            "lower; quantize with rotate_inputs: off for FPGA targets")
    if getattr(act, "outliers", None) is not None:
        raise HardwareError(f"{what}: its quantizer keeps {act.outliers.numel()} outlier input "
                            "channel(s) float (outlier_channels), which no ap_fixed type holds; "
                            "quantize with power_of_two_scales (FPGA targets), which keeps none")
    if getattr(act, "keep_float", False):
        raise HardwareError(f"{what}: its activations were kept float (float_activations, or the "
                            "output-floor fallback), which no ap_fixed type holds; quantize "
                            "without float_activations and with min_output_sqnr_db: null to keep "
                            "every activation on its grid")
    if getattr(act, "dynamic", None) is not None:
        raise HardwareError(f"{what}: its quantizer takes its grid from each input at run time "
                            f"(act_dynamic {act.dynamic}; the quantize default at 4 activation "
                            "bits or fewer), which no fixed ap_fixed type holds; quantize with "
                            "power_of_two_scales: true (FPGA targets), which keeps static ranges")
    s, z = act.scale_zero()
    s, z = s.detach().reshape(-1), z.detach().reshape(-1)
    if s.numel() != 1:
        raise HardwareError(f"{what}: per-channel activation scales are not supported on FPGA "
                            "targets; reparameterize (repq) or use a per-tensor method")
    if not _is_pow2(s):
        raise HardwareError(f"{what}: activation scale {float(s):.4g} is not a power of two, so "
                            "no ap_fixed type holds its grid exactly; quantize with "
                            "power_of_two_scales: true")
    return grid_type(float(s), int(z), act.bits)


def _required_types(graph: HlsGraph, qmodel) -> dict[tuple[str, int], FixedType]:
    """(consumer op, input index) -> the type our quantizer gives that input."""
    from slimformer.quantize.state import key_of

    state = qmodel.quant
    need: dict[tuple[str, int], FixedType] = {}
    for op in graph.ops:
        if op.kind == "dense":
            lq = state.linears[key_of(op.attrs["weight_name"])] \
                if key_of(op.attrs["weight_name"]) in state.linears else None
            if lq is not None:
                need[(op.name, 0)] = _act_type(lq.act, f"input of {op.module}")
    for a in state.attention.values():
        ein = [o for o in graph.ops if o.kind == "einsum" and o.module == a.module]
        sms = [o for o in graph.ops if o.kind == "softmax" and o.module == a.module]
        if len(ein) != 2 or len(sms) != 1:
            raise HardwareError(f"attention at {a.module}: expected two matmuls around one "
                                f"softmax, found {len(ein)} and {len(sms)}")
        need[(ein[0].name, 0)] = _act_type(a.q_in, f"{a.module} queries")
        need[(ein[0].name, 1)] = _act_type(a.k_in, f"{a.module} keys")
        need[(ein[1].name, 1)] = _act_type(a.v_in, f"{a.module} values")
        if not a.probs_float:
            p = a.probs
            if p.kind != "uniform":
                raise HardwareError(f"{a.module}: attention probabilities quantized with "
                                    f"{p.kind} codes have no ap_fixed type; quantize with "
                                    "softmax: uniform (power_of_two_scales) or none")
            s = p.delta / (2**p.bits - 1)
            if not _is_pow2(s.reshape(1)):
                raise HardwareError(f"{a.module}: probability scale {float(s):.4g} is not a "
                                    "power of two; use softmax: none or power_of_two_scales")
            need[(ein[1].name, 0)] = grid_type(float(s), 0, p.bits)
    return need


def _insert_casts(graph: HlsGraph, need: dict[tuple[str, int], FixedType]) -> dict[str, FixedType]:
    """Give each quantized tensor its type, on its producer or through a cast.

    The producer takes the type when every reader wants it; otherwise a cast (hls4ml ``linear``
    activation) goes in front of the quantized reader.
    """
    fixed: dict[str, FixedType] = {}
    by_tensor: dict[str, list[tuple[str, int, FixedType]]] = {}
    for (cons, idx), t in need.items():
        by_tensor.setdefault(graph.op(cons).inputs[idx], []).append((cons, idx, t))
    for tensor, reqs in by_tensor.items():
        types = {t for _, _, t in reqs}
        readers = {o.name for o in graph.consumers(tensor)}
        chain = [tensor]  # walk back through reshape / transpose with a single reader
        while graph.op(chain[-1]).kind in _TRANSPARENT and \
                len(graph.consumers(graph.op(chain[-1]).inputs[0])) == 1:
            chain.append(graph.op(chain[-1]).inputs[0])
        if len(types) == 1 and readers == {c for c, _, _ in reqs} and tensor not in graph.outputs:
            for name in chain:
                fixed[name] = next(iter(types))
            continue
        for cons, idx, t in reqs:
            src = graph.op(cons).inputs[idx]
            cast = Op(f"{src}_to_{cons}", "cast", [src], graph.op(src).shape, graph.op(cons).module)
            graph.ops.insert(graph.ops.index(graph.op(cons)), cast)
            graph.op(cons).inputs[idx] = cast.name
            fixed[cast.name] = t
    return fixed


def _weight_grid(op: Op, qmodel) -> tuple[torch.Tensor, FixedType, str]:
    """The Linear's weight as quantized, and the type holding it."""
    from slimformer.quantize.state import key_of

    lq = None if qmodel is None else qmodel.quant.linears[key_of(op.attrs["weight_name"])] \
        if key_of(op.attrs["weight_name"]) in qmodel.quant.linears else None
    if lq is None:
        w = op.attrs["weight"].double()
        t = fixed_for_range(float(w.min()), float(w.max()), 12)
        return t.quantize(w), t, "float weights rounded to 12 fractional bits"
    with torch.no_grad():
        w = lq.quantized_matrix().detach().double()
    scale = lq.wq.scale.detach().reshape(-1).double()
    if _is_pow2(scale):
        frac = int(round(float(-torch.log2(scale).min())))
        how = "exact (power-of-two weight scales)"
    else:
        frac = int(math.ceil(float(-torch.log2(scale).max()))) + 2
        how = "rounded: weight scales are not powers of two"
    t = fixed_for_range(float(w.min()), float(w.max()), frac)
    return t.quantize(w), t, how


def _bound(t: FixedType) -> float:
    return max(abs(t.min), abs(t.max))


def _prescale_layernorms(graph: HlsGraph, env: dict[str, torch.Tensor], prec: Precisions) -> bool:
    """Shift the input of a LayerNorm whose variance may reach 1 down by ``2^-k`` (exact).

    hls4ml's 1/sqrt table covers variances in ``[0, 2^-p)`` with ``p >= 0`` only: larger ones
    saturate at the last entry. LayerNorm ignores a scale of its input (up to eps), so a
    power-of-two pre-scale (a shift, no multiplier) brings the variance into range.
    """
    changed = False
    for op in [o for o in graph.ops if o.kind == "layernorm"]:
        vmax = float(env[op.inputs[0]].var(-1, unbiased=False).max()) * 2.0
        if vmax < 1:
            continue
        k = math.ceil(math.log2(vmax) / 2) + 1
        pre = Op(f"{op.name}_prescale", "scale", [op.inputs[0]], op.shape, op.module,
                 {"value": 2.0**-k, "prescale": k})
        graph.ops.insert(graph.ops.index(op), pre)
        op.inputs = [pre.name]
        prec.notes.append(f"{op.module}: input variance up to {vmax / 2:.3g} is beyond hls4ml's "
                          f"1/sqrt table (< 1): input shifted by 2^-{k} first (exact)")
        changed = True
    return changed


def assign(graph: HlsGraph, qmodel, calib: dict[str, torch.Tensor], config: HlsConfig) -> Precisions:
    """Types of every operation of ``graph`` (casts inserted where needed).

    Args:
        graph: The lowered model (may gain ``cast`` operations).
        qmodel: The :class:`~slimformer.quantize.state.QuantizedModel` whose quantizers define the
            types, or None for a float model (every tensor free).
        calib: Calibration inputs ``{name: (N, ...)}`` for the ranges of free tensors.
        config: Free and accumulator fractional bits, table size.
    """
    prec = Precisions()
    need = _required_types(graph, qmodel) if qmodel is not None else {}
    fixed_results = _insert_casts(graph, need)
    with torch.no_grad():
        env = run_float(graph, calib)
    if _prescale_layernorms(graph, env, prec):
        with torch.no_grad():
            env = run_float(graph, calib)
    ff = config.free_frac_bits
    for op in graph.ops:
        y = env[op.name]
        lo, hi = float(y.min()) * MARGIN, float(y.max()) * MARGIN
        xs = [prec.result(i) for i in op.inputs]
        if op.name in fixed_results:
            res, src = fixed_results[op.name], "quantizer"
        elif "prescale" in op.attrs:  # a shift: the same bits, the point moved
            k = op.attrs["prescale"]
            res, src = FixedType(xs[0].width, xs[0].integer - k, xs[0].signed), "input"
        elif op.kind in _TRANSPARENT:
            res, src = xs[0], "input"
        elif op.kind in ("softmax", "sigmoid"):
            res, src = FixedType(ff + 1, 1, False), "free"
        else:
            res, src = fixed_for_range(min(lo, 0.0), max(hi, 0.0), ff,
                                       signed=op.kind != "relu" and lo < 0), "free"
        types = {"result": res}
        if op.kind == "dense":
            w, wt, how = _weight_grid(op, qmodel)
            prec.weights[op.name] = w
            x_t = xs[0]
            acc_frac = wt.frac + x_t.frac
            b = op.attrs["bias"].double() if op.attrs["bias"] is not None else torch.zeros(len(w))
            bound = float((w.abs().sum(1) * _bound(x_t) + b.abs()).max())
            if config.accum_frac_bits is not None:
                acc_frac = min(acc_frac, config.accum_frac_bits)
            bt = fixed_for_range(float(b.min()), float(b.max()), acc_frac)
            prec.biases[op.name] = bt.quantize(b)
            types.update(weight=wt, bias=bt, accum=fixed_for_range(-bound, bound, acc_frac))
            prec.source[op.name + ":weight"] = how
        elif op.kind == "einsum":
            bound = _bound(xs[0]) * _bound(xs[1]) * contraction_size(graph, op)
            acc_frac = xs[0].frac + xs[1].frac
            if config.accum_frac_bits is not None:
                acc_frac = min(acc_frac, config.accum_frac_bits)
            types["accum"] = fixed_for_range(-bound, bound, acc_frac)
        elif op.kind == "softmax":
            n = op.shape[op.attrs["axis"]]
            nbits = int(math.log2(config.table_size))
            span = 16.0 / op.attrs["exp_scale"]  # exp(-16) ~ 1e-7: beyond it the table is 0
            i_n = max(1, math.ceil(math.log2(span)))
            lg = max(1, math.ceil(math.log2(n)))
            types.update(
                exp_table=FixedType(18, 1, False), inv_table=FixedType(18, 1, False),
                accum=FixedType(18 + lg, 1 + lg, False),
                inv_inp=FixedType(max(18, nbits + 2), lg + 1, False),
                inp_norm=FixedType(max(18, nbits + 2), i_n, False))
        elif op.kind == "layernorm":
            x = env[op.inputs[0]]
            var = x.var(-1, unbiased=False)
            vmax = float(var.max()) * 2.0
            p = max(0, math.floor(-math.log2(vmax))) if vmax < 1 else 0
            prec.ln_range_power2[op.name] = p
            prec.ln_eps_power[op.name] = max(1, round(-math.log10(op.attrs["eps"])))
            dim = op.shape[-1]
            x_t = xs[0]
            a_int = max(x_t.integer + math.ceil(math.log2(dim)) + 1, 2 * x_t.integer + 1)
            types.update(
                accum=FixedType(a_int + ff + 8, a_int),
                table=fixed_for_range(0, 1 / math.sqrt(10.0 ** -prec.ln_eps_power[op.name]), 16,
                                      signed=True),
                scale=fixed_for_range(float(op.attrs["gamma"].min()), float(op.attrs["gamma"].max()),
                                      ff + 6),
                bias=fixed_for_range(float(op.attrs["beta"].min()), float(op.attrs["beta"].max()),
                                     ff + 6))
        elif op.kind == "sigmoid":
            types["table"] = FixedType(18, 1, False)
        elif op.kind == "mean":
            n = graph.op(op.inputs[0]).shape[0]
            types["accum"] = FixedType(xs[0].width + math.ceil(math.log2(n)) * 2,
                                       xs[0].integer + math.ceil(math.log2(n)))
        elif op.kind == "add_const":
            v = op.attrs["value"]
            types.update(scale=FixedType(2, 2), bias=fixed_for_range(float(v.min()),
                                                                      float(v.max()), ff + 4))
        elif op.kind == "scale":
            v = op.attrs["value"]
            types.update(scale=fixed_for_range(min(v, 0), max(v, 0), 16), bias=FixedType(2, 2))
        prec.fixed[op.name] = types
        prec.source[op.name] = src
    return prec
