"""Our own fixed-point PyTorch reference of an hls4ml project: the same graph, the same types.

Every operation computes in float64 (exact for the widths used here) and casts its result to its
``ap_fixed`` type as the C++ does. Softmax and LayerNorm follow hls4ml's lookup-table
implementations (``softmax_stable``, ``layernorm_1d``) step by step: table index from the top bits
of the normalized input, table entries computed in single precision and cast to the table type.
The C simulation of the project should agree with it on (nearly) every prediction.
"""

from __future__ import annotations

import math

import torch

from slimformer.hardware.fixed import FixedType
from slimformer.hardware.graph import HlsGraph, Op, run_float
from slimformer.hardware.precision import Precisions


def _top_bits_index(x: torch.Tensor, t: FixedType, nbits: int) -> torch.Tensor:
    """hls4ml's table index: the top ``nbits`` bits of ``x`` held in type ``t`` (unsigned)."""
    raw = torch.round(x / t.step).long()  # the integer held in the type
    if t.signed:
        raw = torch.remainder(raw, 2**t.width)
    return torch.div(raw, 2 ** (t.width - nbits), rounding_mode="floor")


def _softmax(op: Op, x: torch.Tensor, types: dict[str, FixedType], table_size: int) -> torch.Tensor:
    axis = op.attrs["axis"] + 1
    nbits = int(math.log2(table_size))
    norm_t, exp_t, inv_t = types["inp_norm"], types["exp_table"], types["inv_table"]
    acc_t, inv_in_t = types["accum"], types["inv_inp"]
    d = norm_t.quantize(x.amax(axis, keepdim=True) - x)
    idx = torch.arange(table_size, dtype=torch.float64)
    real = (idx * 2.0 ** (norm_t.width - nbits) * norm_t.step).float()
    exp_table = exp_t.quantize(torch.exp(-(real * op.attrs["exp_scale"])).double())
    e = acc_t.quantize(exp_table[_top_bits_index(d, norm_t, nbits)])
    s = inv_in_t.quantize(acc_t.quantize(e.sum(axis, keepdim=True)))
    inv_real = (idx * 2.0 ** (inv_in_t.width - nbits) * inv_in_t.step).float()
    inv_table = inv_t.quantize((1.0 / inv_real).double().nan_to_num(posinf=1e30))
    inv = inv_table[_top_bits_index(s, inv_in_t, nbits)]
    return e * inv


def _layernorm(op: Op, x: torch.Tensor, types: dict[str, FixedType], table_size: int,
               range_p2: int, eps_p10: int) -> torch.Tensor:
    acc, table_t = types["accum"], types["table"]
    dim = x.shape[-1]
    k_inv = acc.quantize(torch.tensor(1.0 / dim))
    mean = acc.quantize(acc.quantize(x.sum(-1, keepdim=True)) * k_inv)
    diff = acc.quantize(x - mean)
    var = acc.quantize(acc.quantize(acc.quantize(diff * diff).sum(-1, keepdim=True)) * k_inv)
    index = torch.trunc(var * table_size * 2**range_p2).long().clamp(0, table_size - 1)
    min_val = torch.tensor(10.0 ** -eps_p10, dtype=torch.float32)
    step = torch.tensor(2.0 ** -range_p2 / table_size, dtype=torch.float32)
    ii = torch.arange(table_size, dtype=torch.float32)
    # C++: float in_val; 1.0 / sqrt(in_val): a float square root, a double division
    table = table_t.quantize(1.0 / torch.sqrt(min_val + step * ii).double())
    gamma = types["scale"].quantize(op.attrs["gamma"].double())
    beta = types["bias"].quantize(op.attrs["beta"].double())
    return diff * table[index] * gamma + beta


def _sigmoid(x: torch.Tensor, table_t: FixedType, table_size: int) -> torch.Tensor:
    """hls4ml's sigmoid: a table over [-8, 8), index ``int(x * N / 16) + N / 2``."""
    ii = torch.arange(table_size, dtype=torch.float64)
    in_val = (2 * 8.0 * (ii - table_size / 2.0) / table_size).float()
    val = (1.0 / (1 + torch.exp(-in_val)).double()).float().double()
    table = table_t.quantize(val)
    index = (torch.trunc(x * table_size / 16) + table_size // 2).long().clamp(0, table_size - 1)
    return table[index]


def reference_outputs(graph: HlsGraph, prec: Precisions, inputs: dict[str, torch.Tensor],
                      table_size: int) -> dict[str, torch.Tensor]:
    """Run the fixed-point reference; returns every operation's value ``(N, *shape)`` (float64)."""

    def quant(op: Op, y: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
        t = prec.fixed[op.name]
        k = op.kind
        if k == "dense":
            y = xs[0] @ prec.weights[op.name].t() + prec.biases[op.name]
            y = t["accum"].quantize(y)
        elif k == "einsum":
            y = t["accum"].quantize(y)
        elif k == "softmax":
            y = _softmax(op, xs[0], t, table_size)
        elif k == "layernorm":
            y = _layernorm(op, xs[0], t, table_size, prec.ln_range_power2[op.name],
                           prec.ln_eps_power[op.name])
        elif k == "sigmoid":
            y = _sigmoid(xs[0], t["table"], table_size)
        elif k == "mean":
            acc = t["accum"]
            y = acc.quantize(acc.quantize(xs[0].sum(1)) / xs[0].shape[1])
        elif k == "add_const":
            y = xs[0] + t["bias"].quantize(op.attrs["value"].double())
        elif k == "scale":
            y = xs[0] * float(t["scale"].quantize(torch.tensor(op.attrs["value"])))
        return t["result"].quantize(y)

    return run_float(graph, inputs, quant)
