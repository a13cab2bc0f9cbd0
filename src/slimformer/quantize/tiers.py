"""Precision tiers of one activation site: as configured, 8 bits, float.

A *site* is one activation quantizer and the Linears it feeds (a norm's shared input quantizer
feeds q, k and v; an attention q/k/v input feeds none). Its tiers:

0. as configured;
1. 8 bits (configs below 8 bits): the Linears' weights at 8 bits (min/max per output channel,
   learned rounding dropped) and the activation at 8 bits (min/max of its calibration data, in
   the reparameterized domain); recorded as ``overrides`` (``weight_bits: 8, act_bits: 8``).
   Attention q/k/v inputs have no 8-bit tier (no override addresses them). Weight-only
   (activations float anyway): the Linears' weights at 8 bits, min/max per group (or row),
   rounded to nearest in place of the low-bit codes (GPTQ's);
2. float: tier 1, and the activation kept float (``float_activations``); not with weight-only.

:meth:`Site.set` moves a site between tiers and back exactly (its tier-0 state is kept).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field

import torch
from torch import nn

from slimformer.quantize.act import ActQuantizer
from slimformer.quantize.config import LayerOverride
from slimformer.quantize.state import LinearQuant, key_of

EIGHT = 8


@dataclass(eq=False)
class Site:
    """One activation quantizer, the Linears it feeds and its current tier.

    Attributes:
        act: The activation quantizer.
        linears: The Linears whose input it is.
        can8: Whether tier 1 applies (something below 8 bits, and expressible in the config).
        tier: 0 / 1 / 2.
    """

    act: ActQuantizer
    linears: list[LinearQuant]
    can8: bool
    tier: int = 0
    _saved: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The activation quantizer's name (as configured)."""
        return self.act.name

    def set(self, tier: int) -> None:
        """Move to ``tier`` (1 on a site without it: 0; tier 2 includes tier 1 where it applies)."""
        eight = tier >= 1 and self.can8
        if eight and not self._saved:
            self._saved = _save(self)
            _to_eight(self)
        elif not eight and self._saved:
            _restore(self, self._saved)
            self._saved = {}
        self.act.keep_float = tier >= 2
        self.tier = tier if tier != 1 or self.can8 else 0

    def eight_bit_name(self) -> str:
        """The activation quantizer's name once rebuilt from the config at tier 1+."""
        n = self.name
        if self.can8 and n.startswith("norm:"):
            return n.rsplit(":", 1)[0] + f":{EIGHT}"
        return n

    def bytes_delta(self) -> int:
        """Packed weight bytes tier 1 adds (weights from their bits to 8)."""
        if not self.can8:
            return 0
        bits = self._saved.get("wbits") or [lq.wq.bits for lq in self.linears]
        return sum((n := lq.param[0].numel()) - (n * b + 7) // 8 for lq, b in
                   zip(self.linears, bits, strict=True))


def sites(qmodel) -> list[Site]:
    """Every activation quantizer not already kept float, as a :class:`Site`.

    (Observations are not required: a calibration that frees them block by block leaves the
    ranges; a quantizer the data never reached ranks last, its gain 0.)
    """
    state = qmodel.quant
    feeds: dict[int, list[LinearQuant]] = {}
    for lq in state.linears.values():
        feeds.setdefault(id(lq.act), []).append(lq)
    taken = {a.name for a in state.acts.values()}
    out = []
    for m in state.modules():
        if not isinstance(m, ActQuantizer) or m.keep_float:
            continue
        lqs = feeds.get(id(m), [])
        low = bool(lqs) and (m.bits < EIGHT or any(lq.wq.bits < EIGHT for lq in lqs))
        s = Site(m, lqs, low)
        if low and s.eight_bit_name() != m.name and s.eight_bit_name() in taken:
            s.can8 = False  # another quantizer of that norm is at 8 bits already: float only
        out.append(s)
    return out


def finalize(qmodel, chosen: list[Site]) -> tuple[list[LayerOverride], list[str]]:
    """Rename tier-1+ norm quantizers as a rebuild names them; (overrides, float patterns)."""
    state = qmodel.quant
    overrides, floats = [], []
    for s in chosen:
        if s.tier >= 1 and s.can8:
            overrides += [LayerOverride(pattern=glob.escape(lq.name), weight_bits=EIGHT,
                                        act_bits=EIGHT) for lq in s.linears]
            new = s.eight_bit_name()
            if new != s.act.name:
                _rename(state.acts, key_of(s.act.name), key_of(new))
                s.act.name = new
        if s.tier >= 2:
            floats.append(glob.escape(s.act.name))
    return overrides, floats


def _rename(d: nn.ModuleDict, old: str, new: str) -> None:
    items = [(new if k == old else k, v) for k, v in d.items()]
    d.clear()
    d.update(items)


def _save(s: Site) -> dict:
    a = s.act
    return {"abits": a.bits, "lo": a.lo, "hi": a.hi,
            "wbits": [lq.wq.bits for lq in s.linears],
            "w": [(lq.wq.scale, lq.wq.zero, lq.alpha, lq.int_weight) for lq in s.linears]}


def _restore(s: Site, saved: dict) -> None:
    a = s.act
    a.bits, a.lo, a.hi = saved["abits"], saved["lo"], saved["hi"]
    for lq, b, (scale, zero, alpha, codes) in zip(s.linears, saved["wbits"], saved["w"],
                                                  strict=True):
        lq.wq.bits, lq.wq.scale, lq.wq.zero, lq.alpha, lq._cache = b, scale, zero, alpha, None
        lq.int_weight = codes


@torch.no_grad()
def act_range8(a: ActQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit range of ``a``: min/max of its calibration data, shaped as its range now.

    Per channel where its range is per channel; in the reparameterized domain (after its
    per-channel affine) where it has one. Without observations: the range it has.
    """
    if a._min is None:
        return a.lo.detach(), a.hi.detach()
    lo, hi = a.affine(a._min), a.affine(a._max)  # (C,): the affine may flip the order
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    if a.lo.numel() == 1 or lo.numel() != a.lo.numel():
        lo, hi = lo.min().reshape(1), hi.max().reshape(1)
    return lo, hi


def weight8(lq: LinearQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit min/max ``(scale, zero)`` per output channel (per group) of ``lq``'s float weight."""
    from slimformer.quantize.quantizers import WeightQuantizer

    wq = WeightQuantizer(EIGHT)
    wq.symmetric, wq.pow2 = lq.wq.symmetric, lq.wq.pow2
    wq.calibrate(lq.matrix().detach())
    return wq.scale, wq.zero


def _to_eight(s: Site) -> None:
    a = s.act
    if a.bits < EIGHT:
        lo, hi = act_range8(a)
        a.set_range(lo, hi)
        a.bits = EIGHT
    for lq in s.linears:
        if lq.wq.bits < EIGHT:
            lq.wq.scale, lq.wq.zero = weight8(lq)
            lq.wq.bits, lq.alpha, lq._cache = EIGHT, None, None
            lq.int_weight = None  # codes chosen elsewhere (GPTQ) were the low-bit ones
