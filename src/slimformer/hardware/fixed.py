"""Fixed-point types ``ap_fixed<W, I>`` and their bit-accurate emulation in PyTorch.

A :class:`FixedType` is what hls4ml writes into the C++ (``ap_fixed<W,I,AP_RND_CONV,AP_SAT>``) and
can quantize a float tensor exactly as the C++ cast does: the value is rounded to the grid
``2^(I - W)`` and saturated to the type's range. Computation runs in float64, which holds every
value of a type up to 52 bits exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FixedType:
    """``ap_[u]fixed<width, integer, rounding, saturation>``.

    ``integer`` counts the sign bit for signed types (hls4ml / Xilinx convention) and may be
    negative or exceed ``width``.
    """

    width: int
    integer: int
    signed: bool = True
    rounding: str = "AP_RND_CONV"
    saturation: str = "AP_SAT"

    @property
    def frac(self) -> int:
        """Fractional bits (``width - integer``)."""
        return self.width - self.integer

    @property
    def step(self) -> float:
        """The value of one LSB."""
        return 2.0 ** -self.frac

    @property
    def min(self) -> float:
        """Smallest representable value."""
        return -(2.0 ** (self.integer - 1)) if self.signed else 0.0

    @property
    def max(self) -> float:
        """Largest representable value."""
        top = self.integer - 1 if self.signed else self.integer
        return 2.0**top - self.step

    @property
    def hls(self) -> str:
        """The C++ type name, e.g. ``ap_fixed<18,8,AP_RND_CONV,AP_SAT>``."""
        base = "ap_fixed" if self.signed else "ap_ufixed"
        return f"{base}<{self.width},{self.integer},{self.rounding},{self.saturation}>"

    @property
    def hls4ml(self) -> str:
        """The precision string hls4ml's config reads, e.g. ``fixed<18,8,RND_CONV,SAT>``."""
        base = "fixed" if self.signed else "ufixed"
        return (f"{base}<{self.width},{self.integer},{self.rounding.removeprefix('AP_')},"
                f"{self.saturation.removeprefix('AP_')}>")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` cast to this type (float64 result), as the C++ assignment does."""
        y = x.double() / self.step
        if self.rounding == "AP_RND_CONV":
            y = torch.round(y)  # half to even
        elif self.rounding == "AP_RND":
            y = torch.floor(y + 0.5)
        else:
            y = torch.floor(y)
        lo, hi = self.min / self.step, self.max / self.step
        if self.saturation == "AP_SAT":
            y = y.clamp(lo, hi)
        else:  # wrap around
            span = hi - lo + 1
            y = torch.remainder(y - lo, span) + lo
        return y * self.step


def fixed_for_range(lo: float, hi: float, frac: int, signed: bool | None = None,
                    rounding: str = "AP_RND_CONV") -> FixedType:
    """The narrowest type with ``frac`` fractional bits holding every value in ``[lo, hi]``."""
    signed = lo < 0 if signed is None else signed
    integer = -frac + (1 if signed else 0)  # start at one-LSB range, then widen
    t = FixedType(max(integer + frac, 1), integer, signed, rounding)
    while t.max < hi or t.min > lo:
        integer += 1
        t = FixedType(integer + frac, integer, signed, rounding)
    return t


def grid_type(scale: float, zero: int, bits: int) -> FixedType:
    """The exact type of a uniform grid ``scale * (q - zero)``, ``q`` in ``[0, 2^bits - 1]``.

    ``scale`` must be a power of two. Zero point 0 gives an unsigned ``bits``-bit type; an
    asymmetric grid needs one more bit for the sign.
    """
    f = -math.log2(scale)
    if abs(f - round(f)) > 1e-9:
        raise ValueError(f"scale {scale} is not a power of two")
    frac = round(f)
    lo, hi = -zero * scale, (2**bits - 1 - zero) * scale
    return fixed_for_range(lo, hi, frac, signed=zero > 0)
