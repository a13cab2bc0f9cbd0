"""An estimate of latency and resources from layer shapes, precisions and reuse factors.

Labelled as an estimate everywhere: it is no synthesis result. Model (hls4ml ``io_parallel``,
everything unrolled; per layer, cycles at the target clock): a multiply-accumulate layer takes its
reuse factor plus an adder tree of ``ceil(log2(n) / 3)`` cycles (three adder levels per cycle
at 200 MHz) plus one; softmax 5 cycles plus its adder tree (hls4ml's published Vitis report of a
5-wide stable softmax: 5); LayerNorm two adder trees, a table look-up and two multiplies;
elementwise layers one cycle; reshapes none. Latency is the longest path through the graph.
A multiplication is counted as a DSP when its operand widths add up to more than 16 bits or the
wider operand exceeds 10 bits (narrower ones map to LUTs, ~0.6 LUT per bit product); adders cost
one LUT per accumulator bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from slimformer.hardware.config import HlsConfig
from slimformer.hardware.graph import HlsGraph, contraction_size
from slimformer.hardware.precision import Precisions

# DSP and LUT available on parts whose numbers we hold (from real synthesis reports, SOURCES.md)
PART_RESOURCES = {"xcvu13p": (12_288, 1_728_000), "xcu250": (12_288, 1_728_000),
                  "xc7z020": (220, 53_200)}


def part_resources(part: str) -> tuple[int, int] | None:
    """(DSP, LUT) available on ``part``, when known."""
    for prefix, res in PART_RESOURCES.items():
        if part.lower().startswith(prefix):
            return res
    return None


@dataclass
class Estimate:
    """Estimated latency and resources (not a synthesis result)."""

    cycles: int
    clock_mhz: float
    dsp: int
    lut: int
    per_layer: list[dict] = field(default_factory=list)
    label: str = "estimate (from layer shapes, precisions and reuse factors; not synthesized)"

    @property
    def latency_ns(self) -> float:
        """Latency in nanoseconds at the target clock."""
        return self.cycles * 1000.0 / self.clock_mhz

    @property
    def latency_us(self) -> float:
        """Latency in microseconds."""
        return self.latency_ns / 1000.0


def _tree(n: int) -> int:
    return math.ceil(math.log2(max(n, 2)) / 3)


def _mults(wa: int, wb: int, n: int, reuse: int) -> tuple[int, int]:
    """(DSPs, LUTs) of ``n`` multiplications of ``wa`` x ``wb`` bits with a reuse factor."""
    units = math.ceil(n / reuse)
    if wa + wb > 16 or max(wa, wb) > 10:
        return units * math.ceil(max(wa, wb) / 27) * math.ceil(min(wa, wb) / 18), 0
    return 0, int(units * 0.6 * wa * wb)


def estimate(graph: HlsGraph, prec: Precisions, config: HlsConfig) -> Estimate:
    """Estimate ``graph`` as built with ``prec`` and ``config``."""
    from slimformer.hardware.project import reuse_of

    done: dict[str, int] = {}
    dsp = lut = 0
    rows = []
    for op in graph.ops:
        t = prec.fixed[op.name]
        rf = reuse_of(op, config)
        start = max((done[i] for i in op.inputs), default=0)
        k, d, lu = op.kind, 0, 0
        if k == "dense":
            n_out, n_in = prec.weights[op.name].shape
            rows_ = math.prod(op.shape[:-1])
            wx = prec.result(op.inputs[0]).width
            d, lu = _mults(wx, t["weight"].width, n_in * n_out * rows_, rf)
            lu += rows_ * n_out * n_in * t["accum"].width // rf
            cyc = rf + _tree(n_in) + 1
        elif k == "einsum":
            contract = contraction_size(graph, op)
            mults = math.prod(op.shape) * contract
            d, lu = _mults(prec.result(op.inputs[0]).width, prec.result(op.inputs[1]).width,
                           mults, rf)
            lu += mults * t["accum"].width // rf
            cyc = rf + _tree(contract) + 1
        elif k == "softmax":
            n = op.shape[op.attrs["axis"]]
            slices = op.attrs["n_outer"] * op.attrs["n_inner"]
            d = slices * n  # exp * inverse
            lu = slices * n * t["accum"].width * 2
            cyc = 5 + _tree(n)
        elif k == "layernorm":
            dim = op.shape[-1]
            rows_ = math.prod(op.shape[:-1])
            d = rows_ * dim * 3
            lu = rows_ * dim * t["accum"].width * 3
            cyc = 2 * _tree(dim) + 5
        elif k in ("reshape", "transpose"):
            cyc = 0
        elif k == "mean":
            lu = math.prod(op.shape) * t["accum"].width * graph.op(op.inputs[0]).shape[0]
            cyc = _tree(graph.op(op.inputs[0]).shape[0]) + 1
        else:
            lu = math.prod(op.shape) * t["result"].width
            cyc = 1
        done[op.name] = start + cyc
        dsp, lut = dsp + d, lut + lu
        rows.append({"layer": op.name, "module": op.module, "kind": k, "cycles": cyc,
                     "reuse": rf, "dsp": d, "lut": lu})
    total = max(done[o] for o in graph.outputs)
    return Estimate(total, config.clock_mhz, dsp, lut, rows)
