"""Quantized-weight reconstruction: AdaRound-style learned rounding per Linear.

With the activation quantizers in place, each Linear's rounding (up or down per weight) is learned
to minimize ``|| Q(x) W_q^T - x_fp W^T ||^2`` on calibration inputs (``x`` in the quantized
model, ``x_fp`` in the float one), with AdaRound's rectified
sigmoid and an annealed regularizer that drives every rounding choice to 0 or 1. A quarter of the
rows is held out: the learned rounding is kept only if it also lowers the error there (with a few
thousand rows, 10^5 - 10^6 binary choices can overfit).
"""

from __future__ import annotations

import torch

from slimformer.quantize.state import LinearQuant, soft_round


def reconstruct_linear(lq: LinearQuant, x: torch.Tensor, x_fp: torch.Tensor, steps: int,
                       lr: float = 1e-2, reg: float = 0.1) -> tuple[float, float]:
    """Learn the rounding of ``lq``'s weight.

    ``x (n, in)`` are the layer's inputs in the quantized model (quantized here by its own
    activation quantizer), ``x_fp (n, in)`` the same rows in the float model: the target is the
    float layer's output, so the rounding also corrects error coming from upstream.

    Returns:
        Held-out MSE with nearest rounding and with the rounding kept.
    """
    w = lq.matrix().detach()  # (out, in)
    s, z, bits = lq.wq.scale, lq.wq.zero, lq.wq.bits
    with torch.no_grad():
        xq = lq.act(x)
        target = lq.act.transform(x_fp) @ w.t()  # reparameterized domain, like xq and w
    n_val = max(1, len(x) // 4)
    xq_t, xq_v, t_t, t_v = xq[n_val:], xq[:n_val], target[n_val:], target[:n_val]
    base = torch.floor(w / s)
    rest = w / s - base  # fractional part in [0, 1)
    alpha = -torch.log(1.2 / (rest.clamp(0.01, 0.99) + 0.1) - 1)  # h(alpha) == rest
    alpha.requires_grad_(True)
    opt = torch.optim.Adam([alpha], lr=lr)

    def quant_w(h):
        return s * (torch.clamp(base + h + z, 0, 2**bits - 1) - z)

    def mse(xs, ts, h):
        return ((xs @ quant_w(h).t() - ts) ** 2).mean()

    with torch.no_grad():
        nearest = (rest >= 0.5).float()
        scale = float(mse(xq_t, t_t, nearest)) + 1e-12
        before = float(mse(xq_v, t_v, nearest))
    for step in range(steps):
        h = soft_round(alpha)
        loss = mse(xq_t, t_t, h)
        if step >= steps // 5:  # after a warm-up, anneal beta 20 -> 2 and push h to {0, 1}
            beta = 20 - 18 * (step - steps // 5) / max(1, steps - steps // 5 - 1)
            loss = loss + reg * scale * (1 - (2 * h - 1).abs().pow(beta)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = (soft_round(alpha) >= 0.5).float()
        after = float(mse(xq_v, t_v, hard))
    if after < before:
        lq.alpha = (hard * 20 - 10).detach()  # h(+10) = 1, h(-10) = 0
        return before, after
    return before, before
