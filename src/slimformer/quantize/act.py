"""Activation quantizers with their observers.

An :class:`ActQuantizer` observes activations ``x (..., C)`` during calibration (min/max and a
row sample), is then calibrated (min/max, percentile, per-channel search) and fake-quantizes.
Per-channel quantizers can be reparameterized to one layer-wise scale (RepQ): the per-channel
affine ``x' = (x + shift) * inv_r`` then precedes a per-tensor quantizer with identical codes.
A *dynamic* quantizer (:attr:`ActQuantizer.dynamic`, ``QuantConfig.act_dynamic``) ignores its
calibrated range when it quantizes: each input's grid comes from its own min/max, per tensor or
per token (row of the last axis), as the runtime computes it.
An *online rotation* (``rot_*``, :mod:`~slimformer.quantize.inrotate`) multiplies the input by
an orthogonal ``R`` before all that (observations, ranges and samples are of ``x R``).
*Outlier channels* (:attr:`ActQuantizer.outliers`, chosen by :mod:`~slimformer.quantize.outliers`)
pass through in float: the grid covers the other channels, the Linear after it adds their
products in float (``W[:, O] x_O``), as LLM.int8() splits out its outlier features.
"""

from __future__ import annotations

import torch
from torch import nn

from slimformer.errors import CalibrationError
from slimformer.quantize.hadamard import apply
from slimformer.quantize.quantizers import (
    dynamic_params,
    fake_log2,
    fake_log_sqrt2,
    fake_uniform,
    positive_scale,
    round_ste,
    sq_error,
    symmetric_params,
    uniform_params,
)

SAMPLE_ROWS = 4096  # rows a quantizer keeps by default (ActQuantizer.sample_rows)
# what an ActQuantizer keeps of its calibration data (see ActQuantizer.forget)
_OBSERVATIONS = ("_rows", "_groups", "_min", "_max", "_seen", "group")


class ActQuantizer(nn.Module):
    """Uniform activation quantizer, per tensor or per channel (last axis).

    Asymmetric by default; with ``symmetric`` (set by the builder) the scale is
    ``max(|lo|, |hi|) / (2^(b-1) - 1)`` and the zero point ``2^(b-1)`` (signed codes).
    ``dynamic`` (set by the builder): ``"tensor"`` / ``"token"``, the grid of each input from
    its own range (:func:`~slimformer.quantize.quantizers.dynamic_params`; the calibrated range
    is then unused); None: the calibrated (static) range.
    """

    def __init__(self, name: str, bits: int, per_channel: bool = False):
        super().__init__()
        self.name, self.bits, self.per_channel = name, bits, per_channel
        self.mode = "float"  # float | observe | quant
        self.lo = nn.Parameter(torch.zeros(1), requires_grad=False)  # (C,) or (1,)
        self.hi = nn.Parameter(torch.ones(1), requires_grad=False)  # (C,) or (1,)
        self.register_buffer("shift", None)  # (C,): RepQ's affine x' = (x + shift) * inv_r
        self.register_buffer("inv_r", None)  # (C,)
        self.register_buffer("outliers", None)  # (k,) int64: input channels kept float
        # online rotation x R, R = diag(rot_signs) (rot_a kron rot_b) (quantize.inrotate)
        self.register_buffer("rot_signs", None)  # (C,)
        self.register_buffer("rot_a", None)  # (a, a)
        self.register_buffer("rot_b", None)  # (b, b), a * b = C
        self.pow2 = False
        self.symmetric = False
        self.dynamic: str | None = None  # "tensor" | "token": run-time ranges
        # quant mode passes the input through (the output-floor fallback, float_activations)
        self.keep_float = False
        self._min = self._max = None  # (C,) observed per channel
        self._rows: list[torch.Tensor] = []  # sampled rows, (k, C) per observed call
        self._groups: list[torch.Tensor] = []  # (k,) calibration batch of each sampled row
        self.group = 0  # index of the calibration batch being observed (set by the caller)
        self._seen = 0
        # rows kept: the last 2 * sample_rows (a quarter of them per observed call); set per
        # method by the calibration (phases.SAMPLE_ROWS): min/max only checks on them
        self.sample_rows = SAMPLE_ROWS

    def observe(self, x: torch.Tensor) -> None:
        """Record min/max (per channel) and a sample of rows ``(n, C)``."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (n, C): every position a row
        mn, mx = flat.amin(0), flat.amax(0)  # (C,): NaN and inf reach them (amin/amax keep NaN)
        if not bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
            raise CalibrationError(f"NaN or inf in the calibration activations at {self.name} "
                                   "(the first quantized layer where they appear); check the data")
        if self._min is not None and self._min.shape[-1] != flat.shape[-1]:
            self._to_per_tensor()
        if self._min is not None and self._min.numel() == 1 != flat.shape[-1]:
            flat = flat.reshape(-1, 1)  # (n * C, 1): per-tensor since the width varied
            mn, mx = flat.amin(0), flat.amax(0)  # (1,)
        self._min = mn if self._min is None else torch.minimum(self._min, mn)
        self._max = mx if self._max is None else torch.maximum(self._max, mx)
        take = min(len(flat), max(1, self.sample_rows // 4))
        idx = torch.randperm(len(flat), generator=torch.Generator().manual_seed(self._seen))[:take]
        self._rows.append(flat[idx])  # (take, C)
        self._groups.append(torch.full((len(idx),), self.group))  # (take,): the calibration batch
        self._seen += 1
        # only the last 2 * sample_rows rows are ever used (samples()): older calls are dropped
        while len(self._rows) > 1 and sum(len(r) for r in self._rows[1:]) >= 2 * self.sample_rows:
            self._rows.pop(0)
            self._groups.pop(0)

    @property
    def observed(self) -> bool:
        """Whether calibration rows were observed (and not forgotten)."""
        return bool(self._rows)

    @property
    def width(self) -> int | None:
        """Channels ``C`` of the sampled rows (None before observing)."""
        return self._rows[0].shape[-1] if self._rows else None

    def forget(self) -> dict:
        """Drop the calibration observations (ranges stay); returns them for :meth:`recall`."""
        kept = {k: getattr(self, k) for k in _OBSERVATIONS}
        self._rows, self._groups, self._min, self._max, self._seen, self.group = (
            [], [], None, None, 0, 0)
        return kept

    def recall(self, observations: dict) -> None:
        """Put back observations :meth:`forget` returned."""
        for k, v in observations.items():
            setattr(self, k, v)

    def _to_per_tensor(self) -> None:
        """Keep one range and one column of values: the last axis changed size between calls.

        Happens when a module shared by inputs of different lengths quantizes a tensor whose last
        axis is the sequence (``k^T`` of attention scores); only per-tensor ranges apply then.
        """
        if self.per_channel:
            raise CalibrationError(f"{self.name}: per-channel quantizer saw inputs of different "
                                   f"widths ({self._min.shape[-1]} and another)")
        self._min, self._max = self._min.min().reshape(1), self._max.max().reshape(1)  # (1,)
        self._groups = [g.repeat_interleave(r.shape[-1]) for g, r in zip(self._groups, self._rows,
                                                                          strict=True)]
        self._rows = [r.reshape(-1, 1) for r in self._rows]  # (k * C, 1) each

    def samples(self) -> torch.Tensor:
        """The sampled rows ``(n, C)``."""
        rows = torch.cat(self._rows)
        return rows[-self.sample_rows * 2:]

    def sample_groups(self) -> torch.Tensor:
        """``(n,)``: the calibration batch (:attr:`group`) each sampled row came from."""
        return torch.cat(self._groups)[-self.sample_rows * 2:]

    @torch.no_grad()
    def calibrate(self, how: str, percentile: float = 99.99) -> None:
        """Set the range: ``minmax``, ``percentile`` or ``search`` (per-channel MSE search)."""
        if self._min is None:
            raise CalibrationError(f"{self.name} saw no calibration data: the layer was not run")
        if how == "minmax":
            lo, hi = self._min, self._max
            if not self.per_channel:
                lo, hi = lo.min(), hi.max()
        elif how == "percentile":
            rows = self.samples()  # (n, C)
            flat = rows if self.per_channel else rows.reshape(-1, 1)  # (n, C) or (n * C, 1)
            q = torch.tensor([1 - percentile / 100, percentile / 100])
            lo, hi = torch.quantile(flat[:200_000], q, dim=0)  # (C,) or (1,) each
            if not self.per_channel:
                lo, hi = lo.reshape(()), hi.reshape(())
        elif how == "search":
            lo, hi = self._search(self.samples())
        else:
            raise ValueError(how)
        self.set_range(lo, hi)

    def range_of(self, rows: torch.Tensor, how: str, per_channel: bool) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
        """The range ``minmax`` or ``search`` would pick from ``rows (n, C)`` alone."""
        lo, hi = rows.amin(0), rows.amax(0)  # (C,)
        if not per_channel:
            lo, hi = lo.min(), hi.max()  # ()
        if how == "search":
            return self._search(rows, lo, hi, per_channel)
        return lo, hi

    def _search(self, rows: torch.Tensor, lo0: torch.Tensor | None = None,
                hi0: torch.Tensor | None = None,
                per_channel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (or per-tensor) shrink of [min, max] minimizing quantization MSE."""
        per_channel = self.per_channel if per_channel is None else per_channel
        if lo0 is None:
            lo0, hi0 = (self._min, self._max) if per_channel else (self._min.min(),
                                                                    self._max.max())
        best, best_lo, best_hi = None, lo0, hi0  # bounds (C,) per channel, () per tensor
        for f in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5):
            for g in (1.0, 0.9, 0.8):
                lo, hi = lo0 * g, hi0 * f
                s, z = self._params(lo, hi)
                err = sq_error(rows, s, z, self.bits)  # (n, C)
                err = err.mean(0) if per_channel else err.mean()  # (C,) or ()
                if best is None:
                    best = err
                    continue
                better = err < best
                best = torch.minimum(err, best)
                best_lo = torch.where(better, lo, best_lo)
                best_hi = torch.where(better, hi, best_hi)
        return best_lo, best_hi

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the clipping range ``lo, hi`` (``(C,)`` or one value; stored as ``(C,)`` / ``(1,)``)."""
        self.lo = nn.Parameter(lo.detach().float().clone().reshape(-1), requires_grad=False)
        self.hi = nn.Parameter(hi.detach().float().clone().reshape(-1), requires_grad=False)

    def _params(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the grid covering [lo, hi] (range search; no pow2)."""
        if self.symmetric:
            return symmetric_params(lo, hi, self.bits)
        return uniform_params(lo, hi, self.bits)

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current scale and zero point, ``(C,)`` or ``(1,)`` (zero rounded with an STE)."""
        if self.symmetric:
            scale, zero = symmetric_params(self.lo, self.hi, self.bits)
            if self.pow2:
                scale = torch.exp2(torch.ceil(torch.log2(scale)))
            return scale, zero
        lo = torch.minimum(self.lo, torch.zeros_like(self.lo))
        hi = torch.maximum(self.hi, torch.zeros_like(self.hi))
        scale = positive_scale((hi - lo) / (2**self.bits - 1))
        if self.pow2:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        zero = round_ste(-lo / scale).clamp(0, 2**self.bits - 1)
        return scale, zero

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., C) R``: the online input rotation (identity unless set)."""
        if self.rot_signs is None:
            return x
        return apply(x, self.rot_signs, self.rot_a, self.rot_b)

    def affine(self, x: torch.Tensor) -> torch.Tensor:
        """The reparameterization affine of ``x (..., C)`` (identity unless set).

        On what the quantizer observes (its samples and ranges: after the rotation).
        """
        if self.shift is not None:
            x = (x + self.shift) * self.inv_r
        return x

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The input ``x (..., C)`` as the grid sees it: rotated, then the affine."""
        return self.affine(self.rotate(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe, pass through, or fake-quantize ``x (..., C)`` depending on :attr:`mode`."""
        if self.mode == "observe":
            x = self.rotate(x)  # observed as the grid will see it (the consumers are W R)
            self.observe(x)
            return self.affine(x)  # as float mode passes it on
        if self.mode == "float" or self.keep_float:
            return self.transform(x)  # reparameterized models stay exact in float
        return self.quantized(self.transform(x))

    def keep_mask(self, width: int) -> torch.Tensor | None:
        """``(C,)``: 1 on the quantized channels, 0 on :attr:`outliers`; None without outliers."""
        if self.outliers is None:
            return None
        keep = torch.ones(width, dtype=torch.float32, device=self.outliers.device)
        keep[self.outliers] = 0.0
        return keep

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., C)`` (already transformed) as quant mode gives it.

        Fake-quantized on the grid; its outlier channels (if any) passed through in float.
        """
        keep = self.keep_mask(x.shape[-1])
        if keep is None:
            return self.fake(x)
        keep = keep.to(x.dtype)
        return self.fake(x * keep) + x * (1 - keep)  # zero is on every grid: exact 0 there

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x (..., C)`` (already transformed) on the static or dynamic grid."""
        if self.dynamic is not None:
            scale, zero = dynamic_params(x, self.bits, self.dynamic == "token")
        else:
            scale, zero = self.scale_zero()
        return fake_uniform(x, scale, zero, self.bits)


class ProbQuantizer(nn.Module):
    """Quantizer of attention probabilities: log-sqrt2, log2 or uniform on [0, delta].

    Uniform with ``symmetric`` (set by the builder): the non-negative half of a signed grid,
    scale ``delta / (2^(b-1) - 1)``, zero point 0, codes in ``[0, 2^(b-1) - 1]``.
    """

    KINDS = ("log_sqrt2", "log2", "uniform")

    def __init__(self, name: str, bits: int, kind: str):
        super().__init__()
        self.name, self.bits = name, bits
        self.mode = "float"
        self.symmetric = False
        self.register_buffer("delta", torch.ones(()))
        self.register_buffer("kind_code", torch.zeros((), dtype=torch.uint8))  # saved with it
        self.kind = kind
        # log grids: pass gradients to p straight through (set by qat.convert for fine-tuning;
        # their rounding has none, so nothing before the softmax would learn)
        self.ste = False
        self._rows: list[torch.Tensor] = []  # sampled probabilities, (k,) per observed call

    @property
    def kind(self) -> str:
        """``log_sqrt2`` / ``log2`` / ``uniform`` (mirrored in the buffer ``kind_code``)."""
        return self._kind

    @kind.setter
    def kind(self, value: str) -> None:
        self._kind = value
        self.kind_code = torch.tensor(self.KINDS.index(value), dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._kind = self.KINDS[int(self.kind_code)]

    def observe(self, p: torch.Tensor) -> None:
        """Keep a sample of probabilities ``p (..., Tq, Tk)``."""
        flat = p.detach().reshape(-1).float()  # (n,)
        idx = torch.randint(0, len(flat), (min(len(flat), 50_000),),
                            generator=torch.Generator().manual_seed(len(self._rows)))
        self._rows.append(flat[idx])  # (<= 50,000,)

    @property
    def observed(self) -> bool:
        """Whether probabilities were observed (and not forgotten)."""
        return bool(self._rows)

    def samples(self) -> torch.Tensor:
        """The sampled probabilities ``(n,)``."""
        return torch.cat(self._rows)

    def forget(self) -> dict:
        """Drop the sampled probabilities (``delta`` stays); returns them for :meth:`recall`."""
        kept, self._rows = {"_rows": self._rows}, []
        return kept

    def recall(self, observations: dict) -> None:
        """Put back observations :meth:`forget` returned."""
        self._rows = observations["_rows"]

    def quant(self, p: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantize probabilities with ``delta`` (default: the calibrated one)."""
        d = self.delta if delta is None else delta
        if self.kind in ("log_sqrt2", "log2"):
            out = (fake_log_sqrt2 if self.kind == "log_sqrt2" else fake_log2)(p, d, self.bits)
            if self.ste and torch.is_grad_enabled() and p.requires_grad:
                out = out + (p - p.detach())  # the same values; d out / d p = 1
            return out
        if self.symmetric:
            s = d / (2 ** (self.bits - 1) - 1)
            return fake_uniform(p, s, torch.zeros_like(s), self.bits - 1)  # codes [0, 2^(b-1)-1]
        s = d / (2**self.bits - 1)
        return fake_uniform(p, s, torch.zeros_like(s), self.bits)

    @torch.no_grad()
    def calibrate(self) -> None:
        """Pick ``delta`` among candidates (max and percentiles) minimizing the squared error."""
        if not self._rows:
            raise CalibrationError(f"{self.name} saw no attention probabilities during calibration")
        p = torch.cat(self._rows)  # (n,)
        top = p.max().clamp_min(1e-6)
        cands = [top] + [torch.quantile(p[:200_000], q) for q in (0.9999, 0.999, 0.99)]
        if self.kind != "uniform":
            cands = [torch.tensor(1.0), *cands]
        errs = [((self.quant(p, d.clamp_min(1e-6)) - p) ** 2).mean() for d in cands]
        self.delta = cands[int(torch.stack(errs).argmin())].clamp_min(1e-6).reshape(())
        self.error = float(torch.stack(errs).min())  # mean squared error on the sample

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """Observe, pass through, or fake-quantize ``p``."""
        if self.mode == "observe":
            self.observe(p)
            return p
        if self.mode == "float":
            return p
        return self.quant(p)
