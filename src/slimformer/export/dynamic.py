"""Integer matmuls of Linears whose inputs are quantized at run time (``QuantConfig.act_dynamic``).

Part of the QDQ export (:mod:`slimformer.export.qdq`). A Linear whose input quantizer is dynamic
becomes an integer matmul on ``uint8`` input codes computed in the graph, with the weight codes
``W_q (K, N)`` (``uint8``, or ``int8`` as the QDQ form stores them) and their per-column zero
point ``z_w (N,)`` and scale ``s_w (N,)``:

- per tensor, 8 bits, as ONNX Runtime's ``quantize_dynamic`` writes it (ONNX Runtime fuses it
  into ``DynamicQuantizeMatMul``)::

      x_q, s, z = DynamicQuantizeLinear(x)
      y = Cast<float>(MatMulInteger(x_q, W_q, z, z_w)) * (s * s_w)   [+ bias]

- per token (one range per row of the last axis), or per tensor below 8 bits::

      lo = Min(ReduceMin(x, -1), 0); hi = Max(ReduceMax(x, -1), 0)       # (..., 1)
      s  = (hi - lo) / (2^b - 1)  (1 where 0);  z = Clip(Round(-lo / s), 0, 2^b - 1)
      x_q = Cast<uint8>(Clip(Round(x / s) + z, 0, 2^b - 1))
      acc = MatMulInteger(x_q, W_q, 0, z_w) - Cast<int32>(z) * colsum   # colsum = sum_k (W_q - z_w)
      y = Cast<float>(acc) * (s * s_w)   [+ bias]

  ONNX Runtime's ``MatMulInteger`` takes one input zero point per tensor only (ONNX Runtime
  1.32: "input1 zero point must be a scalar or 1D tensor of size 1"), hence the zero point of
  each row subtracted as ``z * colsum`` in ``int32`` (exact).

The codes are those of the simulation (:func:`~slimformer.quantize.quantizers.dynamic_params`:
the same float operations), so ONNX Runtime differs from PyTorch only by the order of the float
sums. Two custom ops carry the ONNX ops through ``torch.export``
(``slimformer::matmul_integer``, ``slimformer::dynamic_quantize_linear``, registered when this
module is imported, i.e. by the exporter only); :func:`translations` maps them to ONNX.
"""

from __future__ import annotations

import torch
from torch import nn

from slimformer.quantize.quantizers import dynamic_params


@torch.library.custom_op("slimformer::matmul_integer", mutates_args=())
def matmul_integer(a: torch.Tensor, b: torch.Tensor, a_zero: torch.Tensor,
                   b_zero: torch.Tensor) -> torch.Tensor:
    """ONNX ``MatMulInteger``: ``(a - a_zero) @ (b - b_zero)`` in ``int32``; a ``(..., K)``, b ``(K, N)``."""
    prod = (a.to(torch.float64) - a_zero.to(torch.float64)) @ \
        (b.to(torch.float64) - b_zero.to(torch.float64))  # exact below 2^53
    return prod.to(torch.int32)


@matmul_integer.register_fake
def _(a, b, a_zero, b_zero):
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)


@torch.library.custom_op("slimformer::dynamic_quantize_linear", mutates_args=())
def dynamic_quantize_linear(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX ``DynamicQuantizeLinear``: ``uint8`` codes of ``x``, scale ``()``, zero point ``()``."""
    s, z = dynamic_params(x, 8, per_token=False)
    q = torch.clamp(torch.round(x / s) + z, 0, 255)
    return q.to(torch.uint8), s, z.to(torch.uint8)


@dynamic_quantize_linear.register_fake
def _(x):
    return (torch.empty_like(x, dtype=torch.uint8), x.new_empty(()),
            x.new_empty((), dtype=torch.uint8))


def translations() -> dict:
    """``custom_translation_table`` of ``torch.onnx.export`` for the two ops above."""
    from onnxscript import opset18 as op

    def mmi(a, b, a_zero, b_zero):
        return op.MatMulInteger(a, b, a_zero, b_zero)

    def dql(x):
        return op.DynamicQuantizeLinear(x)

    return {torch.ops.slimformer.matmul_integer.default: mmi,
            torch.ops.slimformer.dynamic_quantize_linear.default: dql}


class IntMatmul(nn.Module):
    """One Linear's integer weight for a dynamically quantized input (see module doc).

    Built from the QDQ weight (:class:`~slimformer.export.qdq._QdqWeight`, a plain matrix):
    codes ``(K, N)``, zero point ``(N,)`` in the codes' dtype, scale ``(N,)``, and
    ``colsum (N,)`` ``= sum_k (W_q - z_w)`` in ``int32``; ``keep (K,)``: the input quantizer's
    channel mask (:meth:`~slimformer.quantize.act.ActQuantizer.keep_mask`, 0 on outlier
    channels), None without outlier channels.
    """

    def __init__(self, qweight, bits: int, per_token: bool, keep: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.per_token = bits, per_token
        codes = qweight.codes  # (K, N)
        self.register_buffer("codes", codes.clone())
        self.register_buffer("zero", qweight.zero.to(codes.dtype).clone())  # (N,)
        self.register_buffer("scale", qweight.scale.clone())  # (N,)
        self.register_buffer("colsum", (codes.to(torch.int64) - qweight.zero).sum(0)
                             .to(torch.int32))  # (N,)
        self.qweight = [qweight]  # not a submodule: its float part (outlier channels), if any
        self.register_buffer("keep", keep)  # (K,): 0 on the outlier channels; None: none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., K)`` (float) -> ``(..., N)``: quantized, integer matmul, rescaled.

        Outlier channels: zeroed before the range is taken (their codes are the zero point, so
        they add nothing to the integer sum), their float product added after.
        """
        if self.keep is None:
            return self._integer(x)
        return self._integer(x * self.keep) + self.qweight[0].float_part(x)

    def _integer(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.slimformer
        if not self.per_token and self.bits == 8:
            q, s, z = ops.dynamic_quantize_linear(x)
            acc = ops.matmul_integer(q, self.codes, z, self.zero)  # (..., N) int32
            return acc.to(torch.float32) * (s * self.scale)
        s, z = dynamic_params(x, self.bits, self.per_token)  # (..., 1) or ()
        q = torch.clamp(torch.round(x / s) + z, 0, 2**self.bits - 1).to(torch.uint8)
        acc = ops.matmul_integer(q, self.codes, torch.zeros((), dtype=torch.uint8), self.zero)
        acc = acc - z.to(torch.int32) * self.colsum  # (..., N): each row's zero point out
        return acc.to(torch.float32) * (s * self.scale)
