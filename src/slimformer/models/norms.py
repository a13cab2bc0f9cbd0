"""Recognize a normalization module by its behaviour: which norm, and how its gain is stored.

A norm maps ``x`` to ``x_hat * g + b`` where ``x_hat`` is ``x`` normalized over the last axis
(mean and variance: layer norm; root mean square: RMS norm), and the gain ``g`` is one of the
module's own 1-D parameters, either stored as is (``g = w``) or with an offset (``g = 1 + w``,
as some models store it so that zero-initialized weights mean the identity). Nothing here reads a
module or parameter name: the module is run on probes and the candidates are compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GAIN_OFFSETS = (0.0, 1.0)  # g = offset + w


@dataclass(frozen=True)
class NormForm:
    """How a norm module computes its output.

    Attributes:
        kind: ``layernorm`` or ``rmsnorm``.
        weight: Name (on the module) of the gain parameter, ``""`` when there is none.
        bias: Name of the shift parameter, ``""`` when there is none.
        gain_offset: The effective gain is ``gain_offset + weight`` (0.0 or 1.0).
    """

    kind: str
    weight: str = ""
    bias: str = ""
    gain_offset: float = 0.0


def norm_form(call, cache: dict[int, NormForm | None]) -> NormForm | None:
    """The :class:`NormForm` of the call's module if it normalizes over the last axis, else None.

    Scale-invariant: the module is probed on a synthetic input of the recorded shape (unit scale,
    non-zero mean) and on 16 times that input; a norm gives the same output for both, equal to the
    normalized probe times a gain (one of the module's own 1-D parameters, or 1 plus it) plus an
    optional shift (the other one), or the bare normalized probe for a module without parameters.
    The parameters are replaced by random values for the probe (the module is not changed).
    The activations the model actually saw do not enter the decision, so an activation function
    (not scale-invariant) or an attention module (it owns Linears) is never taken for a norm.
    ``cache`` holds the decision per module object (a shared module is probed once).
    """
    x, y = call.input, call.output
    if x is None or y is None or x is y or x.shape != y.shape or not x.is_floating_point():
        return None
    mod = call.module
    if id(mod) in cache:
        return cache[id(mod)]
    cache[id(mod)] = None
    dim = x.shape[-1]
    named = list(mod.named_parameters(recurse=False))
    if dim < 2 or len(named) > 2 or any(p.shape != (dim,) for _, p in named) or \
            len(list(mod.parameters())) != len(named):
        return None
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(x.shape, generator=gen) * 2 + 0.5).to(x.dtype)
    # the module runs with random parameters of its own shapes (not its trained ones): which
    # parameter is the gain, and whether it is offset, is then never ambiguous (a gain of zeros
    # stored as 1 + w, a shift of zeros)
    rand = {n: (torch.randn(dim, generator=gen) * 0.5).to(p.dtype) for n, p in named}
    own = [(n, rand[n].double()) for n, _ in named]
    try:
        with torch.no_grad():
            y1, y2 = (torch.func.functional_call(mod, rand, (t,)) for t in (probe, probe * 16))
    except Exception:  # noqa: BLE001 - a module that cannot run on one tensor is not a norm
        return None
    if not all(isinstance(t, torch.Tensor) and t.shape == probe.shape for t in (y1, y2)):
        return None
    y1, y2, z0 = y1.detach().double(), y2.detach().double(), probe.double()
    size = y1.norm()
    if not torch.isfinite(size) or size == 0 or (y1 - y2).norm() > 1e-3 * size:
        return None  # not scale-invariant
    zero = ("", torch.zeros(dim, dtype=z0.dtype))
    # (gain, shift) candidates: each own parameter as the gain, the other (if any) as the shift
    pairs = [(own[0], own[1]), (own[1], own[0])] if len(own) == 2 else \
        [(own[0], zero)] if own else [(("", torch.zeros(dim, dtype=z0.dtype)), zero)]
    mu = z0.mean(-1, keepdim=True)
    var, ms = z0.var(-1, unbiased=False, keepdim=True), (z0 * z0).mean(-1, keepdim=True)
    for kind, z in (("layernorm", (z0 - mu) / torch.sqrt(var)), ("rmsnorm", z0 / torch.sqrt(ms))):
        for (wn, w), (bn, b) in pairs:
            for off in GAIN_OFFSETS if wn else (1.0,):  # no gain parameter: the gain is 1
                if (z * (off + w) + b - y1).norm() < 1e-3 * size:
                    form = NormForm(kind, wn, bn, off if wn else 0.0)
                    cache[id(mod)] = form
                    return form
    return None
