"""Quantized-weight reconstruction: AdaRound-style learned rounding per Linear.

With the activation quantizers in place, each Linear's rounding (up or down per weight) is learned
to minimize ``|| Q(x) W_q^T - x W^T ||^2`` on calibration inputs ``x``, with AdaRound's rectified
sigmoid and an annealed regularizer that drives every rounding choice to 0 or 1.
"""

from __future__ import annotations

import torch

from slimformer.quantize.state import LinearQuant, soft_round


def reconstruct_linear(lq: LinearQuant, x: torch.Tensor, steps: int, lr: float = 1e-2,
                       reg: float = 0.01) -> tuple[float, float]:
    """Learn the rounding of ``lq``'s weight on inputs ``x (n, in)``; returns (before, after) MSE."""
    w = lq.matrix().detach()  # (out, in)
    s, z, bits = lq.wq.scale, lq.wq.zero, lq.wq.bits
    with torch.no_grad():
        xq = lq.act(x)
        target = x @ w.t()
    rest = w / s - torch.floor(w / s)  # fractional part in [0, 1)
    alpha = -torch.log((1.1 - (-0.1)) / (rest.clamp(0.01, 0.99) - (-0.1)) - 1)  # h(alpha) = rest
    alpha.requires_grad_(True)
    opt = torch.optim.Adam([alpha], lr=lr)

    def quant_w(h):
        return s * (torch.clamp(torch.floor(w / s) + h + z, 0, 2**bits - 1) - z)

    with torch.no_grad():
        before = float(((xq @ quant_w((rest >= 0.5).float()).t() - target) ** 2).mean())
    for step in range(steps):
        beta = 20 - (20 - 2) * step / max(1, steps - 1)
        h = soft_round(alpha)
        rec = ((xq @ quant_w(h).t() - target) ** 2).mean()
        warm = step < steps // 5
        penalty = 0.0 if warm else reg * (1 - (2 * h - 1).abs().pow(beta)).sum() / w.numel()
        loss = rec + penalty * rec.detach().clamp_min(1e-12) / max(reg, 1e-12) * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = (soft_round(alpha) >= 0.5).float()
        after = float(((xq @ quant_w(hard).t() - target) ** 2).mean())
        if after < before:
            lq.alpha = torch.where(hard > 0, torch.full_like(alpha, 10.0), torch.full_like(
                alpha, -10.0)).detach()
        else:
            after = before
    return before, after
