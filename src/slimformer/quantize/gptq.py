"""GPTQ: error-compensating rounding of one Linear's weight from its calibration inputs.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2023). The columns of ``W (out, in)`` are rounded one at a time; the rounding
error of column ``i`` is spread over the columns not yet rounded through the inverse Hessian of
the layer's squared output error, ``H = 2 X^T X`` (``X (rows, in)``: the Linear's calibration
inputs), so that ``||X W^T - X Q^T||^2`` stays small. Per the paper: ``H`` is damped by
``1%`` of its mean diagonal, its inverse is taken through Cholesky factors (the upper factor of
``H^-1`` holds every step's update row), updates inside a block of 128 columns are applied
lazily to the rest of the matrix once per block, and with ``act_order`` the columns go in order
of decreasing ``diag(H)`` (with groups, their ranges are then fixed from the weights before
rounding: "static groups", so every group stays consecutive columns).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimformer.errors import CalibrationError

DAMP = 0.01  # of the mean Hessian diagonal
BLOCK = 128  # columns per lazy update
CLIP_GRID = torch.linspace(1.0, 0.5, 21)[1:]  # shrink factors of a group's min/max range tried

Params = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Hessian:
    """``H = 2 X^T X / rows`` over batches of a Linear's inputs ``X (..., in)``.

    Also ``absmean``: ``mean |x|`` per input channel ``(in,)``.
    """

    def __init__(self, cols: int):
        self.h = torch.zeros(cols, cols)
        self.absmean = torch.zeros(cols)
        self.rows = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate the rows of ``x (..., in)``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.h.mul_(self.rows / (self.rows + n)).addmm_(x.t(), x, alpha=2 / (self.rows + n))
        self.absmean.mul_(self.rows / (self.rows + n)).add_(x.abs().sum(0) / (self.rows + n))
        self.rows += n

    def scale_inputs(self, s: torch.Tensor) -> None:
        """The Hessian of inputs ``X / s`` (per input channel, as after an AWQ fold)."""
        inv = 1 / s
        self.h.mul_(inv[:, None] * inv[None, :])


def _inverse_factor(h: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``, damping raised tenfold if ``H`` is singular."""
    eye = torch.eye(len(h))
    damp = DAMP * float(torch.diag(h).mean())
    for _ in range(4):
        fac, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(fac)
            up, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return up
        damp *= 10
    raise CalibrationError(f"{name}: the Hessian of its calibration inputs is not positive "
                           "definite even with damping (inputs all zero or not finite?); use "
                           "method minmax or other calibration data")


@torch.no_grad()
def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, params: Params, group: int | None = None,
         act_order: bool = False, name: str = "weight", clip_search: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round ``w (out, in)`` to ``bits``-bit codes with GPTQ's error compensation.

    Args:
        w: The weight ``(out, in)`` (not modified).
        h: The Hessian ``(in, in)`` of its calibration inputs (:class:`Hessian`).
        bits: Bit-width.
        params: ``params(lo, hi) -> (scale, zero)`` of a grid covering ``[lo, hi]`` per row,
            both ``(out, 1)`` (the site's :class:`~slimformer.quantize.quantizers.WeightQuantizer`
            conventions: asymmetric or symmetric).
        group: Input columns per range (a divisor of ``in``), or None: one range per row.
        act_order: Columns in order of decreasing ``diag(H)``.
        name: Names the weight in errors.
        clip_search: Each range (a group of a row) shrunk from its min/max by the factor of
            :data:`CLIP_GRID` (or 1) that minimizes the rounding error weighted by ``diag(H)``,
            ``sum_j H_jj (w_j - q(w_j))^2`` (the output error of rounding that group alone), as
            GPTQ's reference code does with its MSE grid and AWQ's clip search.

    Returns:
        ``codes (out, in)`` uint8, ``scale`` and ``zero`` ``(out, in / group)`` (``(out, 1)``
        without groups); the quantized weight is ``(codes - zero) * scale`` per group.

    Runs on one thread (restored after): the column loop is thousands of small ops, which
    intra-op threads slow down (measured 2.0 -> 0.06 CPU-s for a 576 x 576 weight on 2 busy
    cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(w, h, bits, params, group, act_order, name, clip_search)
    finally:
        torch.set_num_threads(threads)


def _range(wg: torch.Tensor, d: torch.Tensor, params: Params, bits: int, search: bool):
    """``(scale, zero)`` ``(out, 1)`` of the columns ``wg (out, g)``, weights ``d (g,)``.

    Min/max, or the shrink of :data:`CLIP_GRID` with the least ``sum d_j (w_j - q(w_j))^2`` per
    row.
    """
    lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
    best = params(lo, hi)
    if not search:
        return best
    top = 2**bits - 1

    def err(s, z):
        q = (torch.clamp(torch.round(wg / s) + z, 0, top) - z) * s
        return ((q - wg) ** 2 * d).sum(1, keepdim=True)

    best_err = err(*best)
    for f in CLIP_GRID:
        s, z = params(lo * f, hi * f)
        e = err(s, z)
        better = e < best_err
        best = (torch.where(better, s, best[0]), torch.where(better, z, best[1]))
        best_err = torch.minimum(e, best_err)
    return best


def _gptq(w, h, bits, params, group, act_order, name, clip_search=False):
    out, cols = w.shape
    g = group or cols
    if cols % g:
        raise ValueError(f"{name}: group {g} does not divide its {cols} input columns")
    top = 2**bits - 1
    w = w.detach().float().clone()
    h = h.clone()
    dead = torch.diag(h) == 0  # inputs never active: their columns cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    d = torch.diag(h)
    ranges = [_range(w[:, c:c + g], d[c:c + g], params, bits, clip_search)
              for c in range(0, cols, g)] if act_order or group is None else []
    perm = torch.argsort(d, descending=True) if act_order else torch.arange(cols)
    w, h, d = w[:, perm], h[perm][:, perm], d[perm]
    hinv = _inverse_factor(h, name)
    codes = torch.zeros(out, cols)
    if not ranges:
        ranges = [None] * (cols // g)
    block = max(BLOCK, g)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if ranges[col // g] is None:  # dynamic groups: from the updated weights
                ranges[col // g] = _range(w1[:, i:i + g], d[i1 + i:i1 + i + g], params, bits,
                                          clip_search)
            s, z = ranges[col // g]
            x = w1[:, i:i + 1]
            c = torch.clamp(torch.round(x / s) + z, 0, top)
            codes[:, i1 + i] = c[:, 0]
            e = (x - (c - z) * s) / hinv1[i, i]  # (out, 1)
            w1[:, i:] -= e @ hinv1[i:i + 1, i:]
            err1[:, i] = e[:, 0]
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    scale = torch.cat([s for s, _ in ranges], 1)
    zero = torch.cat([z for _, z in ranges], 1)
    return codes.to(torch.uint8), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` with ``scale``/``zero`` ``(out, groups)`` over ``codes (out, in)``."""
    out, cols = codes.shape
    g = cols // scale.shape[1]
    c = codes.float().reshape(out, -1, g)
    return ((c - zero[..., None]) * scale[..., None]).reshape(out, cols)
