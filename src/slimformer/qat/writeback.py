"""A fine-tuned Brevitas student written back into our own quantized model.

``to_quantized(student, ptq)`` copies ``ptq`` (the :class:`~slimformer.quantize.state.QuantizedModel`
the student was converted from, simulated or inference form) and writes into the copy, for every
:class:`~slimformer.qat.layers.QatLinear` of the student (matched by its ``site``, the name of
the quantized weight it came from):

- the weight quantizer's per-channel scale and zero point (``LinearQuant.wq``: Brevitas's
  ``threshold / T`` and its rounded zero point; symmetric grids keep zero point ``2^(b-1)``),
  the float weight as the grid value of the student's integer code (``(code - zero) * scale``,
  so every code is the student's) and, in inference form, the codes themselves;
- the Linear's bias;
- the input quantizer's range (``ActQuantizer.lo / hi``) chosen so that its scale and zero point
  are the student's bit for bit (an ulp off where no float range gives it, see
  :func:`set_exact_range`; RepQ's affine in front stays as it was).

- our attention quantizers' ranges (q, k, v inputs ``lo / hi``, the probabilities' ``delta``),
  learned or not, copied as they are (the student keeps them in our own form: exact).

Everything else (embedding quantizers, quantized weights that are not Linears', float modules)
was frozen during the fine-tuning and stays as it is. The result is an ordinary
quantized model: saved, evaluated and exported as any PTQ result.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimformer.errors import CalibrationError
from slimformer.qat.layers import QatLinear, is_run_time
from slimformer.quantize.quantizers import uniform_codes
from slimformer.quantize.state import LinearQuant, QuantizedModel


@torch.no_grad()
def to_quantized(student: QuantizedModel, ptq: QuantizedModel) -> QuantizedModel:
    """A copy of ``ptq`` holding ``student``'s learned weights, biases, scales and zero points.

    Raises:
        CalibrationError: A quantized weight of ``ptq`` has no Brevitas layer in ``student``
            (not converted from it), or a learned scale / code cannot be written exactly.
    """
    out = copy.deepcopy(ptq)
    out._rebind()
    layers = {m.site: m for m in student.modules() if isinstance(m, QatLinear)}
    owners = {id(m.weight): m for m in out.model.modules() if isinstance(m, nn.Linear)}
    inference = bool(getattr(out, "inference", False))
    ours = {lq.name for lq in student.quant.linears.values()}  # not converted: frozen, as in ptq
    written: set[int] = set()
    for lq in out.quant.linears.values():
        layer = layers.get(lq.name)
        if layer is None and lq.name in ours:
            continue
        if layer is None:
            raise CalibrationError(f"{lq.name}: the fine-tuned model has no Brevitas layer for "
                                   "this weight; it was not converted from this model")
        _write_weight(lq, layer, inference)
        owner = owners.get(id(lq.param[0]))
        if owner is not None and owner.bias is not None and layer.bias is not None:
            owner.bias.copy_(layer.bias)
        if layer.input_quant.is_quant_enabled and not is_run_time(layer.input_quant) \
                and id(lq.act) not in written:  # run-time grids: nothing learned to write
            set_exact_range(lq.act, *_input_grid(layer, lq.act))
            written.add(id(lq.act))
    for key, a in student.quant.attention.items():  # learned or frozen: copied as they are
        b = out.quant.attention[key]
        for name in ("q_in", "k_in", "v_in"):
            src = getattr(a, name)
            getattr(b, name).set_range(src.lo, src.hi)
        b.probs.delta = a.probs.delta.detach().clone()
    out.quant.set_mode("quant")
    return out


def _write_weight(lq: LinearQuant, layer: QatLinear, inference: bool) -> None:
    """The student's weight quantizer and codes into ``lq`` (see module doc)."""
    wq = lq.wq
    q = layer.quant_weight()
    offset = 2 ** (wq.bits - 1) if wq.symmetric else 0  # Brevitas's signed codes are ours - 2^(b-1)
    codes = q.int().float() + offset  # (out, in), ours: [0, 2^b - 1]
    scale = q.scale.detach().float().reshape(-1, 1)  # (out, 1)
    zero = torch.full_like(scale, offset) if wq.symmetric else \
        q.zero_point.detach().float().reshape(-1, 1)
    wq.scale, wq.zero = scale.clone(), zero.clone()
    lq.param[0].copy_(lq._unmatrix((codes - zero) * scale))
    lq.alpha = None
    lq.int_weight = codes.to(torch.uint8) if inference else None
    lq._cache = None
    if not torch.equal(uniform_codes(lq.quantized_matrix(), scale, zero, wq.bits), codes):
        raise CalibrationError(f"{lq.name}: the fine-tuned integer codes do not survive the "
                               "round trip through their grid values")


@torch.no_grad()
def snap_input_scales(student: QuantizedModel) -> int:
    """Move each learned input scale to the nearest one our range form holds; returns how many.

    Our input quantizers keep a range, ``scale = (hi - lo) / (2^b - 1)`` in float32, which
    cannot give every float32 scale (:func:`set_exact_range`: about 1 in 10 for 3-bit grids, 1
    of 24 MiniLM-L6 inputs after a perturbation of 1.4%); a scale an ulp off moves the codes of
    values within an ulp of a rounding boundary, and on a sensitive model (MiniLM-L6 W8A8) those
    grow layer by layer to a written-back model 33 dB from the student. Snapping the student
    first (an ulp; zero points unchanged) makes the write-back exact.
    """
    from slimformer.qat.layers import exact_threshold, threshold
    from slimformer.quantize.act import ActQuantizer

    seen, moved = set(), 0
    for layer in student.modules():
        if not isinstance(layer, QatLinear) or not layer.input_quant.is_quant_enabled \
                or is_run_time(layer.input_quant) or id(layer.input_quant) in seen:
            continue
        seen.add(id(layer.input_quant))
        q = layer.input_quant(torch.zeros(1))
        # our grid: the bit-width, symmetric where Brevitas's is signed (convert.to_brevitas)
        scratch = ActQuantizer("snap", int(q.bit_width))
        scratch.symmetric = bool(q.signed)
        scale, zero = _ours(q, scratch)
        if set_exact_range(scratch, scale, zero):
            continue
        held = scratch.scale_zero()[0]  # (1,): the closest scale a range gives
        tq = layer.input_quant.fused_activation_quant_proxy.tensor_quant
        tq.scaling_impl.value.copy_(exact_threshold(held, threshold(scratch.bits,
                                                                    scratch.symmetric))
                                    .reshape(tq.scaling_impl.value.shape))
        if not scratch.symmetric:
            tq.zero_point_impl.value.copy_((zero * held).reshape(tq.zero_point_impl.value.shape))
        if not all(torch.equal(a, b) for a, b in zip(_input_grid(layer, scratch), (held, zero),
                                                     strict=True)):
            raise CalibrationError(f"{layer.site}: the learned input scale could not be moved "
                                   "to one our quantizer holds")
        moved += 1
    return moved


def _input_grid(layer: QatLinear, act) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero) (1,)`` of ``layer``'s input quantizer in our form (see :func:`_ours`)."""
    return _ours(layer.input_quant(torch.zeros(1)), act)


def _ours(q, act) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero) (1,)`` of Brevitas quant tensor ``q`` in our form for ``act``'s grid.

    Brevitas's signed (symmetric) codes are ours less ``2^(b-1)``: its zero point 0 is ours
    ``2^(b-1)``.
    """
    zero = q.zero_point.detach().reshape(1)
    if act.symmetric:
        zero = zero + 2 ** (act.bits - 1)
    return q.scale.detach().reshape(1), zero


def set_exact_range(act, scale: torch.Tensor, zero: torch.Tensor, tries: int = 16) -> bool:
    """Set ``act.lo / hi`` so that ``act.scale_zero()`` is ``(scale, zero)``; True when exact.

    ``scale, zero (1,)``. The range ``[-z s, (2^b - 1 - z) s]`` (symmetric: ``+-(2^(b-1) - 1) s``)
    can miss ``s`` by an ulp through ``(hi - lo) / (2^b - 1)``; its wider end is moved one ulp at
    a time until the division gives ``s``. Where no range does (an ulp of the range, divided,
    steps over ``s``), the closest scale found is kept (an ulp off: a code moves only for a value
    within an ulp of a rounding boundary); the zero point is always ``zero``.
    """
    s, z = act.scale_zero()
    if torch.equal(s, scale) and torch.equal(z, zero):
        return True  # its range gives them already (not learned, or learned back): kept as is
    b = act.bits
    if act.symmetric:
        hi = scale * (2 ** (b - 1) - 1)
        lo = -hi
    else:
        lo, hi = -zero * scale, (2**b - 1 - zero) * scale
    best = None
    for _ in range(tries):
        act.set_range(lo, hi)
        s, z = act.scale_zero()
        if torch.equal(z, zero):
            if torch.equal(s, scale):
                return True
            miss = float((s - scale).abs().max())
            if best is None or miss < best[0]:
                best = (miss, lo.clone(), hi.clone())
        out = torch.where(s < scale, torch.full_like(s, torch.inf), torch.full_like(s, -torch.inf))
        if act.symmetric:
            hi = torch.nextafter(hi, out)
            lo = -hi
        elif bool((hi.abs() >= lo.abs()).all()):
            hi = torch.nextafter(hi, out)
        else:
            lo = torch.nextafter(lo, -out)
    if best is None:
        raise CalibrationError(f"{act.name}: no range gives the learned zero point "
                               f"{float(zero[0]):g} with scale {float(scale[0]):.6g}")
    act.set_range(best[1], best[2])
    return False
