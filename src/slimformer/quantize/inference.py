"""The inference form of a quantized model: integer weights, layer-wise scales, log2 softmax codes.

``to_inference(qmodel)`` freezes the simulated model: every weight becomes integer codes with a
per-channel (scale, zero point); every activation quantizer is per tensor (after RepQ's
reparameterization); log-sqrt2 attention probabilities become codes whose product with V is
computed as shifts plus one multiplication by sqrt(2): ``A V = d (E V + sqrt2 O V)``, where E
and O hold ``2^-ceil(q/2)`` for the even and odd codes. It gives the simulated model's outputs.
"""

from __future__ import annotations

import copy

import torch

from slimformer.errors import CalibrationError


@torch.no_grad()
def to_inference(qmodel, inplace: bool = False):
    """A copy of ``qmodel`` in inference form (see module doc); ``inplace``: ``qmodel`` itself.

    ``inplace`` saves a copy of the whole model (the quantize stage has no use for the
    simulated form once the inference form exists).
    """
    from slimformer.quantize.state import QuantizedModel

    out: QuantizedModel = qmodel if inplace else copy.deepcopy(qmodel)
    if not inplace:
        out._rebind()
    for lq in out.quant.linears.values():
        m = lq.quantized_matrix()
        codes = torch.round(m / lq.wq.scale + lq.wq.zero).clamp(0, 2**lq.wq.bits - 1)
        lq.int_weight = codes.to(torch.uint8)
        lq.alpha = None
        lq._cache = None
    for eq in out.quant.embeddings.values():
        w = eq.param[0]
        codes = torch.round(w / eq.wq.scale + eq.wq.zero).clamp(0, 2**eq.wq.bits - 1)
        eq.int_weight = codes.to(torch.uint8)
        eq._cache = None
    for name, act in out.quant.named_modules():
        lo = getattr(act, "lo", None)
        if isinstance(lo, torch.Tensor) and lo.numel() > 1:  # by its range, also after loading
            raise CalibrationError(f"{name} is still per channel: reparameterize first")
    for a in out.quant.attention.values():
        a.inference = True
    out.quant.set_mode("quant")
    out.inference = True
    return out
