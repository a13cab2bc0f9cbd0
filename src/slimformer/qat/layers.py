"""The Brevitas pieces of a QAT model: learned-scale quantizers, the QuantLinear, the RepQ affine.

Quantizers (Brevitas injectors, plain data): integer, round to nearest, full range (not narrow),
constant bit-width, float scale held as a learned parameter (``ScalingImplType.PARAMETER``, the
LSQ form: the straight-through rounding passes gradients to the scale); per output channel for
weights ``(out, 1)``, per tensor for inputs. Asymmetric grids are unsigned with a learned zero
point (``ParameterZeroPoint``, stored in float as ``z * s`` and rounded to an integer in the
forward); symmetric grids are signed with zero point 0.

Inputs quantized at run time (``act_dynamic: token | tensor``) keep no learned range: their
Brevitas proxy is Brevitas's dynamic one, whose scale and zero point come from each input by our
own rule (:class:`RunTimeScale`, :class:`RunTimeZero`: ``quantize.quantizers.dynamic_params``),
so step 0 and the written-back model compute the same grids.

Brevitas's parameter is the clipping threshold, ``scale = value / T`` with ``T`` the largest
integer magnitude of the grid (:func:`threshold`): ``2^b - 1`` unsigned, ``2^(b-1)`` signed
(``-min_int``: Brevitas's ``IntScaling`` of a full-range signed grid). The initial threshold is
chosen so that the division gives back our float32 scale bit for bit (:func:`exact_threshold`).
"""

from __future__ import annotations

import torch
from brevitas.core.function_wrapper import RoundSte
from brevitas.core.quant import IntQuant
from brevitas.core.restrict_val import PowerOfTwoRestrictValue
from brevitas.core.scaling import ScalingPerOutputType
from brevitas.core.zero_point import ParameterZeroPoint, ZeroZeroPoint
from brevitas.inject import ExtendedInjector
from brevitas.inject.enum import (
    BitWidthImplType,
    FloatToIntImplType,
    QuantType,
    RestrictValueType,
    ScalingImplType,
)
from brevitas.nn import QuantLinear
from brevitas.proxy.runtime_quant import DynamicActQuantProxyFromInjector
from brevitas.quant.solver import ActQuantSolver, WeightQuantSolver
from brevitas.quant_tensor import QuantTensor
from torch import nn

from slimformer.quantize.quantizers import dynamic_params


class OnnxOrderIntQuant(IntQuant):
    """Brevitas's integer quantizer with the zero point added after rounding.

    ``clamp(round(x / s) + z)``, as ONNX ``QuantizeLinear`` and our quantizers compute it;
    Brevitas's own ``round(x / s + z)`` differs where ``x / s`` is a tie (half to even, ``z``
    odd) or within float32's resolution at ``z`` of one (a few values in 10^4): on MiniLM-L6
    that moved codes in the first layer (66.7 dB apart) and left the QAT student at step 0
    22 dB from the model it was converted from.
    """

    def to_int(self, scale: torch.Tensor, zero_point: torch.Tensor, bit_width: torch.Tensor,
               x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (straight-through rounding)."""
        y = self.float_to_int_impl(self.input_view_impl(x) / scale) + zero_point
        return self.tensor_clamp_impl(y, min_val=self.min_int(bit_width),
                                      max_val=self.max_int(bit_width))


class _Grid(ExtendedInjector):
    """Shared quantizer attributes (see module doc)."""

    quant_type = QuantType.INT
    int_quant = OnnxOrderIntQuant
    bit_width_impl_type = BitWidthImplType.CONST
    float_to_int_impl_type = FloatToIntImplType.ROUND
    narrow_range = False
    scaling_impl_type = ScalingImplType.PARAMETER
    restrict_scaling_type = RestrictValueType.FP


class SymmetricWeight(_Grid, WeightQuantSolver):
    """Signed per-output-channel weight grid, learned scale, zero point 0."""

    signed = True
    scaling_per_output_type = ScalingPerOutputType.CHANNEL
    zero_point_impl = ZeroZeroPoint


class AsymmetricWeight(_Grid, WeightQuantSolver):
    """Unsigned per-output-channel weight grid, learned scale and zero point."""

    signed = False
    scaling_per_output_type = ScalingPerOutputType.CHANNEL
    zero_point_impl = ParameterZeroPoint
    quantize_zero_point = True


class SymmetricInput(_Grid, ActQuantSolver):
    """Signed per-tensor input grid, learned scale, zero point 0."""

    signed = True
    scaling_per_output_type = ScalingPerOutputType.TENSOR
    zero_point_impl = ZeroZeroPoint


class AsymmetricInput(_Grid, ActQuantSolver):
    """Unsigned per-tensor input grid, learned scale and zero point."""

    signed = False
    scaling_per_output_type = ScalingPerOutputType.TENSOR
    zero_point_impl = ParameterZeroPoint
    quantize_zero_point = True


class _RunTimeGrid(nn.Module):
    """One part of an input's run-time asymmetric grid: ``(..., 1)`` per token, ``()`` per tensor.

    Our rule (``dynamic_params``: the range holds 0, no gradient through it), so Brevitas's
    dynamic input quantizer gives the codes our ``act_dynamic`` quantizer gives.
    """

    part = 0  # 0: scale, 1: integer zero point

    def __init__(self, bit_width: int, per_token: bool):
        super().__init__()
        self.bits, self.per_token = int(bit_width), bool(per_token)

    def forward(self, x: torch.Tensor, *_brevitas_args) -> torch.Tensor:
        """The part of ``x (..., C)``'s grid (Brevitas's other arguments are unused)."""
        return dynamic_params(x, self.bits, self.per_token)[self.part]


class RunTimeScale(_RunTimeGrid):
    """Scale of an input's run-time grid (Brevitas's ``scaling_impl``)."""

    part = 0


class RunTimeZero(_RunTimeGrid):
    """Integer zero point ``round(-min(lo, 0) / s)`` of the same grid (``zero_point_impl``)."""

    part = 1


class RunTimeInput(_Grid, ActQuantSolver):
    """Unsigned input grid from each input's own range (per token or per tensor), not learned.

    Set ``input_per_token`` and ``input_bit_width`` when building the layer.
    """

    proxy_class = DynamicActQuantProxyFromInjector
    signed = False
    scaling_per_output_type = ScalingPerOutputType.TENSOR
    scaling_impl = RunTimeScale
    zero_point_impl = RunTimeZero


def is_run_time(proxy) -> bool:
    """Whether a Brevitas input proxy takes its grid from each input (:class:`RunTimeInput`)."""
    return isinstance(proxy, DynamicActQuantProxyFromInjector)


def threshold(bits: int, signed: bool, pow2: bool = False) -> int:
    """``T``: Brevitas's scale is its learned threshold divided by it (see module doc).

    Power-of-two grids divide by a power of two (Brevitas's ``PowerOfTwoIntScaling``):
    ``2^(b-1)`` signed, ``2^b`` unsigned.
    """
    if pow2:
        return 2 ** (bits - 1) if signed else 2**bits
    return 2 ** (bits - 1) if signed else 2**bits - 1


def is_pow2(scaling_impl: nn.Module) -> bool:
    """Whether a Brevitas ``scaling_impl`` learns a power-of-two scale (its log2, rounded)."""
    restrict = getattr(getattr(scaling_impl, "restrict_clamp_scaling", None),
                       "restrict_value_impl", None)
    return isinstance(restrict, PowerOfTwoRestrictValue)


def exact_threshold(scale: torch.Tensor, t: int) -> torch.Tensor:
    """``v`` near ``scale * t`` with ``v / t == scale`` exactly (elementwise, float32).

    ``(s * t) / t`` can miss ``s`` by one ulp, which moves a code at a rounding boundary; the
    neighbours of ``s * t`` one ulp away are tried where it does.
    """
    v = scale * t
    for step in (torch.inf, -torch.inf):
        near = torch.nextafter(scale * t, torch.full_like(v, step))
        v = torch.where(v / t == scale, v, near)
    return v


def quantizer_kwargs(prefix: str, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                     symmetric: bool, pow2: bool = False) -> dict:
    """``QuantLinear`` keyword arguments initializing a quantizer from our ``scale``, ``zero``.

    Ours: ``codes = clamp(round(x / s) + z, 0, 2^b - 1)`` with ``z = 2^(b-1)`` when symmetric,
    which is Brevitas's signed grid ``clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)`` shifted.
    ``pow2`` (our scales are powers of two, FPGA targets): Brevitas learns ``log2`` of the
    threshold and rounds it (straight through) to an integer, so every learned scale stays a
    power of two; the initial threshold ``s T`` is one exactly.
    """
    t = threshold(bits, symmetric, pow2)
    init = scale.detach().clone() * t if pow2 else exact_threshold(scale.detach().clone(), t)
    kw = {f"{prefix}bit_width": bits, f"{prefix}scaling_init": init}
    if pow2:
        kw[f"{prefix}restrict_scaling_type"] = RestrictValueType.POWER_OF_TWO
        kw[f"{prefix}restrict_value_float_to_int_impl"] = RoundSte
    if not symmetric:
        kw[f"{prefix}zero_point_init"] = (zero * scale).detach().clone()
    return kw


class QatLinear(QuantLinear):
    """Brevitas ``QuantLinear`` that runs on torch 2.14.

    Brevitas 0.12.1 strips tensor names with ``Tensor.rename(None)`` on every input; named
    tensors are gone from torch 2.14, and without names that call is the identity, so it is
    skipped (outside tracing; during tracing Brevitas's own handling is kept).

    ``site``: the name of the quantized weight (:class:`~slimformer.quantize.state.LinearQuant`)
    it was converted from, set by :func:`~slimformer.qat.convert.to_brevitas`.

    ``outliers (k,)`` (:meth:`split_out`; None: every channel quantized): input channels kept
    float, as our :class:`~slimformer.quantize.act.ActQuantizer` keeps them. The Brevitas input
    quantizer sees the input with those channels zeroed (zero is on every grid: their code is
    the zero point and adds nothing), and ``x_O @ Wq[:, O]^T`` is added in float with the
    fake-quantized weight ``Wq``: ``Wq (Q(x * keep) + x * (1 - keep))``, our model's product
    (one matmul, as ours: a split sum rounds differently and flips codes downstream),
    with gradients to the weight, its scales and the input range.
    """

    site: str = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("outliers", None)

    def split_out(self, channels: torch.Tensor) -> None:
        """Keep the input channels ``channels (k,)`` float (see class doc)."""
        self.outliers = channels.detach().clone().long()

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., out)``; outlier channels as in the class doc."""
        if self.outliers is None:
            return super().forward(inp)
        keep = torch.ones(inp.shape[-1], dtype=inp.dtype, device=inp.device)
        keep[self.outliers] = 0
        q = self.input_quant(inp * keep)  # dequantized values; straight-through gradients
        q = q.value if isinstance(q, QuantTensor) else q
        w = self.quant_weight().value  # (out, in)
        # one product over all channels, in our model's order: the same float sums
        return nn.functional.linear(q + inp * (1 - keep), w, self.bias)

    def unpack_input(self, inp):
        """The input as it is (see class doc)."""
        if torch._C._get_tracing_state() is not None:
            return super().unpack_input(inp)
        return inp


class InputAffine(nn.Module):
    """RepQ's per-channel affine ``x' = (x + shift) * inv_r`` before a layer-wise quantizer.

    Left by reparameterization where it could not be folded into a norm (post-norm models);
    ``shift, inv_r (C,)`` are fixed buffers.
    """

    def __init__(self, shift: torch.Tensor, inv_r: torch.Tensor):
        super().__init__()
        self.register_buffer("shift", shift.detach().clone())
        self.register_buffer("inv_r", inv_r.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x + shift) * inv_r`` for ``x (..., C)``."""
        return (x + self.shift) * self.inv_r


class InputRotation(nn.Module):
    """The online input rotation ``x R`` of :mod:`~slimformer.quantize.inrotate` (fixed buffers).

    ``signs (C,)``, ``a (a, a)``, ``b (b, b)``: ``R = diag(signs) (a kron b)``; the Linear after
    it holds ``W R``.
    """

    def __init__(self, signs: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("signs", signs.detach().clone())
        self.register_buffer("a", a.detach().clone())
        self.register_buffer("b", b.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., C) R``."""
        from slimformer.quantize.hadamard import apply

        return apply(x, self.signs, self.a, self.b)
