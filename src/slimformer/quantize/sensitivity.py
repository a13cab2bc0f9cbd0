"""Each site's share of the output error, from one forward and backward: the fallback's ranking.

The quantized model's output error ``L`` (vs float, on a few calibration rows) is differentiated
once with respect to every activation quantizer's output ``q(x)`` and every quantized weight
``W_q``. Moving a site to a tier removes part of its quantization noise ``e``; to first order
that lowers ``L`` by ``<dL/dq, e>`` (``e = q(x) - x`` to float, ``q(x) - q8(x)`` to 8 bits; for
weights ``W_q - W_8``). With ``L`` the squared output error ``|r|^2``, ``r = sum_i J_i e_i``,
the gains of all sites sum to ``2 |r|^2``: each site's share of the output error.

``L`` per budget kind: output SQNR (``db``): the squared error of every floating output over
the reference's energy; points and perplexity (``pt``, ``ppl``): the KL divergence of the class
scores' softmax from float's (squared error where the model has no class scores).
Gradients pass the rounding straight through (as calibration does).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from slimformer.quantize.quantizers import fake_uniform
from slimformer.quantize.tiers import EIGHT, Site, act_range8, weight8

GRAD_BATCH = 4  # rows per forward+backward (bounds the memory of the saved activations)


def _loss(ref, out, inputs: dict, kind: str) -> torch.Tensor:
    from slimformer.models.outputs import class_scores
    from slimformer.quantize.capture import real_positions
    from slimformer.quantize.check import float_leaves

    if kind in ("pt", "ppl"):
        r, g = class_scores(ref), class_scores(out)
        if r is not None and r.dim() >= 2:
            r, g = real_positions(r, inputs), real_positions(g, inputs)
            p = torch.log_softmax(r.double(), -1)
            return (p.exp() * (p - torch.log_softmax(g.double(), -1))).sum()
    loss = 0.0
    for r, g in zip(float_leaves(ref), float_leaves(out), strict=True):
        r, g = real_positions(r, inputs).double(), real_positions(g, inputs).double()
        loss = loss + ((g - r) ** 2).sum() / (r**2).sum().clamp_min(1e-30)
    return loss


@contextmanager
def _probes(sites: list[Site]):
    """Probe leaves of every site's activation outputs and weights, for one forward.

    Yields a list of ``(site name, part, leaf, noise)``: ``part`` ``act8`` / ``actf`` (the
    activation's noise to 8 bits / to float) or ``w8`` (a weight's noise to 8 bits); the
    gradient at ``leaf`` times ``noise`` is that part's first-order gain.
    """
    hooks, found = [], []

    def act_hook(s: Site, to8: tuple | None):
        def hook(mod, args, out):
            if mod.mode != "quant" or mod.keep_float:
                return None
            x = mod.transform(args[0]).detach()
            q = out.detach()
            z = torch.zeros_like(out, requires_grad=True)  # d out = d z: a leaf for the gradient
            found.append((s.name, "actf", z, q - x))
            if to8 is not None:
                found.append((s.name, "act8", z, q - fake_uniform(x, *to8, EIGHT)))
            return out + z

        return hook

    for s in sites:
        to8 = None
        if s.can8 and s.act.bits < EIGHT:
            lo, hi = act_range8(s.act)
            bits, old = s.act.bits, (s.act.lo, s.act.hi)
            s.act.set_range(lo, hi)
            s.act.bits = EIGHT
            to8 = tuple(t.detach() for t in s.act.scale_zero())
            s.act.bits, (s.act.lo, s.act.hi) = bits, old
        hooks.append(s.act.register_forward_hook(act_hook(s, to8)))
        for lq in s.linears if s.can8 and s.tier == 0 else []:
            if lq.wq.bits >= EIGHT:
                continue
            with torch.no_grad():
                wq = lq._unmatrix(lq.quantized_matrix()).detach()
                scale, zero = weight8(lq)
                w8 = lq._unmatrix(fake_uniform(lq.matrix(), scale, zero, EIGHT)).detach()
            leaf = wq.clone().requires_grad_()
            found.append((s.name, "w8", leaf, wq - w8))
            lq.weight = (lambda t=leaf: t)  # this forward uses the leaf (instance attribute)
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()
        for s in sites:
            for lq in s.linears:
                lq.__dict__.pop("weight", None)


def rank(qmodel, rows, sites: list[Site], kind: str) -> dict[str, tuple[float, float]]:
    """``{site name: (gain to 8 bits, gain to float)}`` at the sites' current tiers.

    A gain is the first-order decrease of the output error (larger: more effect). Tier 2 (float)
    includes tier 1's weights where the site has tier 1.

    Args:
        qmodel: The quantized model (its quantizers as they are set now).
        rows: A few rows (calibration rows: the ranking only orders the sites).
        sites: The candidate sites.
        kind: The budget kind (``db``, ``pt``, ``ppl``): which output error is differentiated.
    """
    from slimformer.data.datasets import trim_padding

    parts = {s.name: {"act8": 0.0, "actf": 0.0, "w8": 0.0} for s in sites}
    state = qmodel.quant
    params = [p for p in qmodel.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for i in range(0, len(rows), GRAD_BATCH):
            inputs, _ = trim_padding([rows[j] for j in range(i, min(len(rows), i + GRAD_BATCH))])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(i)
                state.set_mode("float")
                with torch.no_grad():
                    ref = qmodel(**inputs)
                torch.manual_seed(i)
                state.set_mode("quant")
                with _probes(sites) as found, torch.enable_grad():
                    loss = _loss(ref, qmodel(**inputs), inputs, kind)
                    if not found or not loss.requires_grad:
                        continue
                    leaves = list({id(f[2]): f[2] for f in found}.values())
                    grads = dict(zip(map(id, leaves), torch.autograd.grad(
                        loss, leaves, allow_unused=True), strict=True))
            for name, part, leaf, noise in found:
                g = grads[id(leaf)]
                if g is not None:
                    parts[name][part] += float((g.double() * noise.double()).sum())
    finally:
        for p in params:
            p.requires_grad_(True)
        state.set_mode("quant")
    out = {}
    for s in sites:
        p = parts[s.name]
        w = p["w8"] if s.can8 else 0.0
        out[s.name] = (w + p["act8"], w + p["actf"])
    return out
