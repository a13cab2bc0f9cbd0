"""Weight-only ranges per group of input columns, on a quantized Linear.

A Linear with :attr:`~slimformer.quantize.state.LinearQuant.group` ``g`` keeps one scale and
zero point per ``g`` consecutive input columns of each output row: its
:meth:`~slimformer.quantize.state.LinearQuant.matrix` is the ``(out * in / g, g)`` view, one row
per group, so the per-row machinery (fake quantization, integer codes, bit-packing two 4-bit
codes per byte in :mod:`~slimformer.quantize.pack`, the artifact's ``(rows, 1)`` scales) holds
groups as it holds channels. This module rounds such a Linear to nearest or stores the codes that
:func:`~slimformer.quantize.gptq.gptq` chose.
"""

from __future__ import annotations

import torch

from slimformer.quantize.quantizers import fake_uniform


@torch.no_grad()
def nearest(lq, m: torch.Tensor | None = None) -> torch.Tensor:
    """``m (out, in)`` (default: the Linear's weight) rounded to nearest; ``(out, in)`` values.

    On min/max ranges of its groups (or rows), in the site's conventions (bits, symmetric).
    """
    full = lq.full_matrix().detach() if m is None else m
    rows = full.reshape(-1, lq.group) if lq.group is not None else full
    s, z = lq.wq._params(rows.amin(1, keepdim=True), rows.amax(1, keepdim=True))
    return fake_uniform(rows, s, z, lq.wq.bits).reshape(full.shape)


@torch.no_grad()
def round_to_nearest(lq) -> None:
    """Set the Linear's ranges to min/max per group (or row): round-to-nearest (RTN)."""
    lq.wq.calibrate(lq.matrix().detach(), search=False)
    lq.int_weight = None
    lq._cache = None


@torch.no_grad()
def set_codes(lq, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Store codes chosen elsewhere: ``codes (out, in)`` uint8, ``scale``/``zero (out, groups)``.

    They become the Linear's integer weight (what its quantized forward and the artifact use),
    in the rows of its :meth:`~slimformer.quantize.state.LinearQuant.matrix`.
    """
    rows = lq.matrix().shape[0]
    lq.int_weight = codes.reshape(rows, -1).to(torch.uint8)
    lq.wq.scale, lq.wq.zero = scale.reshape(rows, 1).float(), zero.reshape(rows, 1).float()
    lq.alpha = None
    lq._cache = None
