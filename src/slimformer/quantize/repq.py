"""RepQ-style scale reparameterization and RepQuant's learned dual clipping.

A per-channel activation quantizer ``(s_c, z_c)`` at the input of the Linears a norm feeds becomes
one layer-wise ``(s~, z~)``: ``s~ = mean(s)``, ``z~ = round(mean(z))``, ``r = s / s~``. The
per-channel affine ``x' = (x + s (z - z~)) / r`` gives ``round(x'/s~) + z~ == round(x/s) + z``
exactly; every consumer Linear absorbs it: ``W' = W diag(r)``, ``b' = b - W s (z - z~)``.
Where the norm feeds only Linears and has weight and bias, the affine is folded into the norm
(``gamma' = gamma / r``, ``beta' = (beta + s (z - z~)) / r``; a gain stored as ``1 + w`` folds as
``w' = (1 + w) / r - 1``); otherwise (post-norm models, whose
norm output is also the residual, or RMSNorm without bias) it stays as the norm's second affine
output on the quantized branch.

Symmetric quantizers (zero point ``2^(b-1)`` everywhere): ``z_c = z~``, so ``shift = 0``; the
layer-wise quantizer is set first (range ``+-(2^(b-1) - 1) mean(s)``) and ``r = s / s~`` uses the
scale it actually has, so its codes are those of the per-channel quantizer (power-of-two scales
included: then ``r`` is a power of two too).
"""

from __future__ import annotations

import torch
from torch import nn

from slimformer.quantize.act import ActQuantizer
from slimformer.quantize.quantizers import fake_uniform, positive_scale, symmetric_params


def _affine_params(model: nn.Module, site) -> tuple[nn.Parameter, nn.Parameter] | None:
    """The gain and shift parameters of norm ``site`` (as discovery found them by behaviour)."""
    if not site.weight or not site.bias:
        return None
    params = dict(model.named_parameters())
    w, b = params.get(site.weight), params.get(site.bias)
    if w is None or b is None or w.shape != (site.dim,) or b.shape != (site.dim,):
        return None
    return w, b


def folds_into_norm(model: nn.Module, norm) -> bool:
    """Whether RepQ's per-channel scales at ``norm``'s output fold into its affine exactly.

    Otherwise the reparameterization keeps a per-channel affine on the quantized branch, which
    fixed-point (FPGA) targets cannot apply.
    """
    return bool(norm.foldable) and _affine_params(model, norm) is not None


@torch.no_grad()
def reparameterize(qmodel, smap) -> list[str]:
    """Fold every per-channel activation quantizer to one layer-wise scale; returns notes.

    Sites: inputs of the Linears a norm feeds (folded into the norm affine where exact) and
    inputs of MLP fc2 layers (the affine stays before the quantizer, on the activation output).
    """
    notes = []
    state = qmodel.quant
    norm_by_weight = {w: n for n in smap.norms for w in n.linears}
    groups: dict[int, list] = {}
    for lq in state.linears.values():
        if lq.act.per_channel:
            groups.setdefault(id(lq.act), []).append(lq)
    for users in groups.values():
        act = users[0].act
        s, z = act.scale_zero()
        s, z = s.detach(), z.detach().round()
        if act.symmetric:
            n = 2 ** (act.bits - 1) - 1
            act.per_channel = False
            act.set_range(-(s.mean() * n).reshape(1), (s.mean() * n).reshape(1))
            s_t, z_t = (v.detach().reshape(()) for v in act.scale_zero())
        else:
            s_t, z_t = s.mean(), z.mean().round()
        r = s / s_t
        shift = s * (z - z_t)
        for lq in users:
            w = lq.matrix()  # (out, in) view of the parameter
            b_fix = w @ shift  # (out,)
            w.mul_(r)  # in place on the model's parameter: columns scaled by r
            bias = _bias_of(qmodel.model, lq)
            if bias is not None:
                bias.sub_(b_fix)
            elif b_fix.abs().max() > 0:
                _add_bias(qmodel.model, lq, -b_fix)
        norm = norm_by_weight.get(users[0].name)
        aff = None
        if norm is not None and norm.foldable and set(norm.linears) == {u.name for u in users}:
            aff = _affine_params(qmodel.model, norm)
        if aff is not None:
            gamma, beta = aff
            # the effective gain is offset + w (offset 1 where stored as 1 + w): g' = g / r
            off = norm.gain_offset
            gamma.add_(off).div_(r).sub_(off)
            beta.add_(shift).div_(r)
            how = "folded into the norm affine" + (
                f" (gain stored as {off:g} + w: w' = ({off:g} + w) / r - {off:g})" if off else "")
        else:
            act.shift, act.inv_r = shift.clone(), (1.0 / r).clone()
            if norm is None:
                why = "after the MLP activation"
            elif norm.other_consumers:
                why = "the norm output also feeds " + ", ".join(norm.other_consumers)
            else:
                why = "the norm has no bias to fold into"
            how = f"kept as a per-channel affine on the quantized branch ({why})"
        if not act.symmetric:
            lo_t, hi_t = -z_t * s_t, (2**act.bits - 1 - z_t) * s_t
            act.per_channel = False
            act.set_range(lo_t.reshape(1), hi_t.reshape(1))
        site = norm.module if norm is not None else users[0].name
        notes.append(f"{site} -> {len(users)} Linear(s): per-channel scales (r in "
                     f"[{float(r.min()):.2f}, {float(r.max()):.2f}]) reparameterized to one "
                     f"scale, {how}")
    return notes


def _bias_of(model: nn.Module, lq) -> torch.Tensor | None:
    owner, _, attr = lq.name.rpartition(".")
    mod = model.get_submodule(owner)
    if attr == "in_proj_weight":
        return getattr(mod, "in_proj_bias", None)
    return getattr(mod, "bias", None) if isinstance(getattr(mod, "bias", None),
                                                    torch.Tensor) else None


def _add_bias(model: nn.Module, lq, value: torch.Tensor) -> None:
    owner, _, _ = lq.name.rpartition(".")
    mod = model.get_submodule(owner)
    if isinstance(mod, nn.Linear) and mod.bias is None:
        mod.bias = nn.Parameter(value.clone())
        return
    raise ValueError(f"{lq.name}: zero-point shift needs a bias, and the layer has none")


def learn_dual_clipping(act: ActQuantizer, weights: list[torch.Tensor], steps: int,
                        lr: float = 5e-3) -> float:
    """Learn per-channel lower/upper clipping bounds minimizing the Linears' output error.

    Loss: sum over consumer Linears of ``|| (Q(X) - X) W^T ||^2`` on the sampled calibration rows
    ``X (n, C)``, with straight-through rounding. Bounds move in units of each channel's initial
    range. The bounds are learned on the rows of some calibration batches and kept only if they
    lower the loss on the rows of the others by :data:`~slimformer.quantize.holdout.MARGIN`
    (clipping what a few rows hold overfits: an outlier of unseen rows is cut). Returns the
    relative reduction of the held-out loss (0.0 when the bounds were not kept).
    """
    from slimformer.quantize.holdout import MARGIN

    x_all = act.samples()
    groups = act.sample_groups()
    held_mask = groups % 2 == 1  # odd calibration batches validate, even ones fit
    if not held_mask.any() or held_mask.all():  # one batch: hold out a random quarter
        g = torch.Generator().manual_seed(0)
        held_mask = torch.rand(len(x_all), generator=g) < 0.25
    perm = torch.Generator().manual_seed(0)
    x = x_all[~held_mask]
    x = x[torch.randperm(len(x), generator=perm)[:2048]]
    x_held = x_all[held_mask]
    x_held = x_held[torch.randperm(len(x_held), generator=perm)[:2048]]
    ws = [w.detach() for w in weights]
    lo0, hi0 = act.lo.detach().clone(), act.hi.detach().clone()
    # work in units of the data (quantization is scale-equivariant): squares of tiny activations
    # would underflow float32 and leave no gradient
    unit = torch.maximum(lo0.abs().max(), hi0.abs().max())
    unit = unit if float(unit) > 0 else torch.ones(())
    x, x_held, lo0, hi0 = x / unit, x_held / unit, lo0 / unit, hi0 / unit
    w_unit = max(float(w.abs().max()) for w in ws) if ws else 1.0
    ws = [w / (w_unit if w_unit > 0 else 1.0) for w in ws]
    span = hi0 - lo0  # bounds move in units of each channel's own range (never a fixed floor)
    span = torch.where(span > 0, span, span.max()).clamp_min(torch.finfo(torch.float32).tiny)
    u = torch.zeros(2, lo0.numel(), requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)

    def params(lo, hi):
        if act.symmetric:
            return symmetric_params(lo, hi, act.bits)
        s = positive_scale((hi - lo) / (2**act.bits - 1))
        z = ((-lo / s).round() - (-lo / s)).detach() + (-lo / s)
        return s, z.clamp(0, 2**act.bits - 1)

    def loss_at(rows, lo, hi):
        s, z = params(lo, hi)
        err = fake_uniform(rows, s, z, act.bits) - rows
        return sum(((err @ w.t()) ** 2).mean() for w in ws)

    def bounds():
        lo = torch.minimum(lo0 + span * u[0], torch.zeros_like(lo0))
        return lo, torch.maximum(hi0 + span * u[1], lo + 1e-4 * span)

    with torch.no_grad():
        first = float(loss_at(x, lo0, hi0))
    best, best_lo, best_hi = first, lo0, hi0
    for _ in range(steps):
        opt.zero_grad()
        lo, hi = bounds()
        loss = loss_at(x, lo, hi)
        if loss.item() < best:
            best, best_lo, best_hi = loss.item(), lo.detach().clone(), hi.detach().clone()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held0 = float(loss_at(x_held, lo0, hi0))
        held = float(loss_at(x_held, best_lo, best_hi))
    if not held < MARGIN * held0:  # no clear held-out gain: keep the observed range
        return 0.0
    act.set_range(best_lo * unit, best_hi * unit)
    return 1.0 - held / held0 if held0 > 0 else 0.0
