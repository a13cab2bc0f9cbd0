"""Quantizers: uniform (per-tensor / per-channel, asymmetric or symmetric), log2 and log-sqrt2.

All fake-quantize (quantize then dequantize) in float, with a straight-through estimator for the
rounding so that clipping bounds can be learned. Shapes: ``x (..., C)``; per-channel parameters
broadcast over the last axis for activations, over axis 0 for weights ``(out, in)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SQRT2 = math.sqrt(2.0)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def uniform_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an asymmetric ``bits``-bit grid covering [lo, hi] (and 0)."""
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = positive_scale((hi - lo) / (2**bits - 1))
    zero = (-lo / scale).round().clamp(0, 2**bits - 1)
    return scale, zero


def positive_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` where it is positive; 1 where the range is empty (the data are all zero there).

    Relative to the data, not an absolute floor: a range of 1e-23 keeps a step of 1e-23 / 255
    (an absolute floor such as 1e-8 rounded such activations to zero). Only float32's smallest
    normal number bounds it, so ``x / scale`` stays finite.
    """
    return torch.where(scale > 0, scale, torch.ones_like(scale)).clamp_min(
        torch.finfo(torch.float32).tiny)


def symmetric_params(lo: torch.Tensor, hi: torch.Tensor,
                     bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``max(|lo|, |hi|) / (2^(b-1) - 1)`` and zero point ``2^(b-1)`` of a symmetric grid.

    Codes stay unsigned (``[0, 2^b - 1]``, zero at ``2^(b-1)``); ``code - 2^(b-1)`` is the signed
    integer. Values inside ``[lo, hi]`` get codes in ``[1, 2^b - 1]``.
    """
    amax = torch.maximum(lo.abs(), hi.abs())
    scale = positive_scale(amax / (2 ** (bits - 1) - 1))
    return scale, torch.full_like(scale, 2 ** (bits - 1))


def fake_uniform(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)`` with STE rounding.

    Without gradients (every calibration and evaluation forward) the same float operations in
    the same order run in place on one buffer: the same values (``(round(v) - v) + v`` equals
    ``round(v)``), one allocation instead of eight (the activation quantizers' forward was the
    largest cost of calibration that is not a matmul).
    """
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad
                                           or zero.requires_grad):
        return torch.div(x, scale).round_().add_(zero).clamp_(0, 2**bits - 1).sub_(zero) \
            .mul_(scale)
    q = torch.clamp(round_ste(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def dynamic_params(x: torch.Tensor, bits: int, per_token: bool) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Asymmetric grid of ``x (..., C)`` from its own range, as computed at run time.

    ``per_token``: one range per row of the last axis, scale and zero point ``(..., 1)``; else
    one for the whole tensor, ``()``. The range always holds 0 (as ONNX
    ``DynamicQuantizeLinear``: scale ``(max(hi, 0) - min(lo, 0)) / (2^b - 1)``, zero point
    ``round(-min(lo, 0) / scale)``); an all-zero row gets scale 1. No gradient through the range.
    """
    x = x.detach()
    if per_token:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)  # (..., 1)
    else:
        lo, hi = x.min(), x.max()  # ()
    return uniform_params(lo, hi, bits)


@torch.no_grad()
def sq_error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``(fake_uniform(x) - x)^2`` elementwise, without gradients, in one buffer.

    The same float operations in the same order as :func:`fake_uniform` (whose straight-through
    rounding ``(round(v) - v) + v`` equals ``round(v)`` exactly), so the same values; used by the
    range searches, which evaluate many grids over the same rows.
    """
    q = torch.div(x, scale).round_().add_(zero).clamp_(0, 2**bits - 1)
    return q.sub_(zero).mul_(scale).sub_(x).square_()


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, 0, 2^b - 1)`` (as float)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def log_sqrt2_codes(p: torch.Tensor, delta: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``q = clamp(round(-2 log2(p / delta)), 0, 2^b - 1)`` and the mask of values that flush to 0."""
    raw = torch.round(-2 * torch.log2((p / delta).clamp_min(1e-30)))
    levels = 2**bits
    return raw.clamp(0, levels - 1), raw >= levels


def log_sqrt2_dequant(q: torch.Tensor, zero_mask: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``delta * 2^(-ceil(q/2)) * (1 + (sqrt2 - 1)(q mod 2))``, zero where flushed."""
    odd = torch.remainder(q, 2)
    val = delta * torch.exp2(-torch.ceil(q / 2)) * (1 + (SQRT2 - 1) * odd)
    return torch.where(zero_mask, torch.zeros_like(val), val)


def fake_log_sqrt2(p: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """Log-sqrt2 fake quantization of probabilities in [0, 1]."""
    q, z = log_sqrt2_codes(p, delta, bits)
    return log_sqrt2_dequant(q, z, delta)


def fake_log2(p: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """Plain log2 quantization: ``delta * 2^-q``, ``q = clamp(round(-log2(p / delta)))``."""
    raw = torch.round(-torch.log2((p / delta).clamp_min(1e-30)))
    levels = 2**bits
    val = delta * torch.exp2(-raw.clamp(0, levels - 1))
    return torch.where(raw >= levels, torch.zeros_like(val), val)


class WeightQuantizer(nn.Module):
    """Per-output-channel uniform quantizer of a weight ``(out, in)``.

    Asymmetric by default; ``symmetric`` (set by the builder) uses :func:`symmetric_params`.

    Calibrated by searching, per channel, a shrink factor of the min/max range that minimizes
    the squared rounding error (``search=True``), or plain min/max.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.pow2 = False  # power-of-two scales (FPGA targets: exact ap_fixed weights)
        self.symmetric = False  # zero point 2^(b-1): signed int8 codes (TensorRT)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero", torch.zeros(1))

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor, search: bool = False) -> None:
        """Set per-channel scale/zero from ``w (out, in)``."""
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)  # (out, 1)
        best_s, best_z = self._params(lo, hi)
        if search:
            best_err = sq_error(w, best_s, best_z, self.bits).sum(1, keepdim=True)  # (out, 1)
            for f in torch.linspace(0.5, 0.98, 25):
                s, z = self._params(lo * f, hi * f)
                err = sq_error(w, s, z, self.bits).sum(1, keepdim=True)
                better = err < best_err
                best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
                best_err = torch.minimum(err, best_err)
        self.scale, self.zero = best_s, best_z

    def _params(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.symmetric:
            s, z = symmetric_params(lo, hi, self.bits)
            if self.pow2:
                s = torch.exp2(torch.ceil(torch.log2(s)))
            return s, z
        s, z = uniform_params(lo, hi, self.bits)
        if self.pow2:
            s = torch.exp2(torch.ceil(torch.log2(s)))
            z = (-torch.minimum(lo, torch.zeros_like(lo)) / s).round().clamp(0, 2**self.bits - 1)
        return s, z

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``w``."""
        return fake_uniform(w, self.scale, self.zero, self.bits)


def log2_two_scale_pv(probs_codes: torch.Tensor, flushed: torch.Tensor, delta: torch.Tensor,
                      v: torch.Tensor, matmul) -> torch.Tensor:
    """``A V`` from log-sqrt2 codes: ``delta * (E V + sqrt2 * O V)`` (shifts + one multiply)."""
    shift = torch.exp2(-torch.ceil(probs_codes / 2))
    shift = torch.where(flushed, torch.zeros_like(shift), shift)
    odd = torch.remainder(probs_codes, 2).bool()
    even_part = torch.where(odd, torch.zeros_like(shift), shift)
    odd_part = torch.where(odd, shift, torch.zeros_like(shift))
    return delta * (matmul(even_part, v) + SQRT2 * matmul(odd_part, v))
