"""AWQ: activation-aware per-input-channel weight scales, folded into the norm that feeds them.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(2024). Input channels that carry large activations matter most; scaling their weight columns up
by ``s`` before rounding (and their inputs down by ``s``) rounds them more finely. Per group of
Linears reading one norm's output, ``s = mean|x|^alpha`` (normalized to geometric mean 1) with
``alpha`` on a grid in ``[0, 1)`` chosen by the group's output error after round-to-nearest,
``sum ||X W^T - X (Q(W diag(s)) diag(1/s))^T||^2``, computed exactly over every calibration row
from the Hessian ``H = 2 X^T X / rows`` as ``trace(D H D^T)`` (``D``: the weight error). The
chosen ``s`` is folded: the norm's gain and shift divided by ``s`` (a gain stored as ``1 + w``
folds as ``w' = (1 + w) / s - 1``), each Linear's columns multiplied, so nothing is added at
inference and the float model computes the same function.
"""

from __future__ import annotations

import torch

from slimformer.quantize.groupwise import nearest

GRID = 20


@torch.no_grad()
def output_error(lqs: list, h: torch.Tensor, s: torch.Tensor | None = None) -> float:
    """Squared output error of the Linears rounded to nearest with columns scaled by ``s``."""
    total = 0.0
    for lq in lqs:
        w = lq.full_matrix().detach().float()
        d = w - (nearest(lq, w * s) / s if s is not None else nearest(lq, w))  # (out, in)
        total += float(((d @ h) * d).sum())
    return total


@torch.no_grad()
def search_scale(lqs: list, h: torch.Tensor, act_mean: torch.Tensor
                 ) -> tuple[torch.Tensor, float, float, float]:
    """The per-input-channel scale ``s (in,)`` of lowest output error for Linears sharing inputs.

    Args:
        lqs: The quantized Linears reading the same input.
        h: Hessian ``(in, in)`` of that input.
        act_mean: ``mean |x|`` per input channel ``(in,)``.

    Returns:
        ``(s, alpha, error with s, error without)``; ``s`` is all ones when no scale helps.
    """
    plain = output_error(lqs, h)
    best = (torch.ones_like(act_mean), 0.0, plain)
    base = act_mean.float().clamp_min(1e-8)
    for k in range(1, GRID):
        alpha = k / GRID
        s = base.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = output_error(lqs, h, s)
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], plain


@torch.no_grad()
def fold(model, norm, lqs: list, s: torch.Tensor) -> bool:
    """Fold ``s`` into norm site ``norm`` (gain and shift ``/ s``) and its Linears (columns ``* s``).

    Returns False (nothing changed) when the norm has no per-channel gain of the right size.
    """
    params = dict(model.named_parameters())
    gain = params.get(norm.weight) if norm.weight else None
    if gain is None or gain.shape != s.shape:
        return False
    shift = params.get(norm.bias) if norm.bias else None
    gain.copy_((gain + norm.gain_offset) / s.to(gain.dtype) - norm.gain_offset)
    if shift is not None and shift.shape == s.shape:
        shift.div_(s.to(shift.dtype))
    for lq in lqs:
        lq.full_matrix().mul_(s.to(lq.param[0].dtype))  # in place on the model's parameter
        lq._cache = None
    return True
