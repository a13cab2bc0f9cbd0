"""Outlier input channels kept float: the massive activations of trained models split out.

Trained transformers carry a few input channels (hidden dimensions) whose values are tens to
hundreds of times the rest: post-LayerNorm dimensions of BERT-family encoders, the inputs of a
decoder's MLP down-projections. One per-tensor grid over them spends its codes on the few and
collapses the rest onto a handful of codes. As LLM.int8() does, those channels ``O`` are taken
out of the quantized product: the grid covers the other channels only and the Linear adds
``W[:, O] x_O`` in float (``|O|`` columns of a few thousand; the export writes it as a ``Gather``
and a small float ``MatMul`` beside the integer one, :mod:`slimformer.export.qdq`).

Per per-tensor input quantizer of plain Linears (static, or dynamic: ``act_dynamic``, whose
run-time range then leaves them out too; not RepQ-reparameterized, not with power-of-two scales,
whose fixed-point targets have no float path), channels are taken
by their observed magnitude ``max |x_c|``, largest first, in counts ``1, 2, 4, ...`` up to
``QuantConfig.outlier_channels`` and 1/:data:`FRACTION` of the channels; a count is kept where
it brings the consumer Linears' output error ``sum ||(Q(x) - x) W^T||^2`` on the sampled
calibration rows under :data:`GAIN` times the best count so far (so two equal outliers are
found together, and a flat channel profile keeps none). The range is refitted without them by
the method's rule (min/max or percentile).
"""

from __future__ import annotations

import torch

from slimformer.quantize.act import ActQuantizer

GAIN = 0.5  # a larger count must bring the output error under GAIN x the best so far
ROWS = 1024  # sampled calibration rows the error is measured on (seeded subsample)
FRACTION = 32  # at most 1/32 of a Linear's input channels float (its float share stays small)


def _consumers(state, act: ActQuantizer) -> list:
    return [lq for lq in state.linears.values() if lq.act is act]


def _eligible(act: ActQuantizer, users: list) -> bool:
    plain = all(lq.axis is None and lq.param[0].dim() == 2 and lq.group is None for lq in users)
    return (bool(users) and plain and act.observed and act._min is not None
            and act._min.numel() > 8 and not act.per_channel and act.shift is None
            and not act.pow2 and not act.keep_float
            and all(lq.matrix().shape[1] == act._min.numel() for lq in users))


def _range(act: ActQuantizer, keep: torch.Tensor, rows: torch.Tensor, how: str,
           percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor range of the kept channels (``keep (C,)`` bool) by ``how``."""
    if how == "percentile":
        flat = rows[:, keep].reshape(-1)[:200_000]
        q = torch.tensor([1 - percentile / 100, percentile / 100])
        lo, hi = torch.quantile(flat, q)
        return lo, hi
    return act._min[keep].min(), act._max[keep].max()


def _error(act: ActQuantizer, rows: torch.Tensor, keep: torch.Tensor, lo, hi,
           mats: list[torch.Tensor], gram: torch.Tensor | None) -> float:
    """``sum ||(Q(x) - x) W^T||^2`` over the consumers, outlier channels exact."""
    old = act.lo, act.hi
    act.set_range(lo, hi)
    k = keep.to(rows.dtype)
    d = act.fake(rows * k) - rows * k  # (n, C): 0 on the outlier channels
    act.lo, act.hi = old
    if gram is not None:  # C < total outputs: d G d^T with G = sum W^T W (C, C)
        return float(((d @ gram) * d).sum())
    return float(sum((d @ w.t()).pow(2).sum() for w in mats))


@torch.no_grad()
def choose_outliers(state, most: int, how: str = "minmax", percentile: float = 99.99,
                    progress=None) -> list[str]:
    """Set :attr:`ActQuantizer.outliers` (and the refitted range) where it pays; returns notes.

    ``most``: the largest count per quantizer (``QuantConfig.outlier_channels``; 0: nothing);
    ``how``: the range rule of the method (``minmax`` / ``percentile``).
    """
    if most <= 0:
        return []
    sites = [(act, users) for act in state.acts.values()
             if _eligible(act, users := _consumers(state, act))]
    kept, total = [], 0
    for i, (act, users) in enumerate(sites):
        if progress is not None:
            progress("outlier channels", i, len(sites))
        amax = torch.maximum(act._min.abs(), act._max.abs())  # (C,)
        order = torch.argsort(amax, descending=True)
        counts = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                  if k <= min(most, amax.numel() // FRACTION)]
        if not counts or amax[order[counts[-1]]] > 0.8 * amax[order[0]]:
            continue  # no channel stands out: the range would hardly shrink
        rows = act.samples().float()
        if len(rows) > ROWS:
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[
                :ROWS]]
        mats = [lq.matrix().detach().float() for lq in users]  # (out, C) each
        outs = sum(w.shape[0] for w in mats)
        gram = sum(w.t() @ w for w in mats) if rows.shape[1] < outs else None
        keep = torch.ones(amax.numel(), dtype=torch.bool)
        base = _error(act, rows, keep, act.lo.reshape(()), act.hi.reshape(()), mats, gram)
        best, best_k, best_range = base, 0, None
        for k in counts:
            keep = torch.ones(amax.numel(), dtype=torch.bool)
            keep[order[:k]] = False
            lo, hi = _range(act, keep, rows, how, percentile)
            err = _error(act, rows, keep, lo, hi, mats, gram)
            if err < GAIN * best:
                best, best_k, best_range = err, k, (lo, hi)
        if best_k:
            old = float(torch.maximum(act.lo.abs(), act.hi.abs()).max())
            act.outliers = order[:best_k].sort().values.clone()
            act.set_range(*best_range)
            new = float(torch.maximum(act.lo.abs(), act.hi.abs()).max())
            kept.append((base / max(best, 1e-30), act.name, best_k, old, new))
            total += best_k
    if progress is not None and sites:
        progress("outlier channels", len(sites), len(sites))
    if not kept:
        return []
    kept.sort(reverse=True)
    top = "; ".join(f"{name} {k} ch, range {old:.3g} -> {new:.3g}, error /{gain:.3g}"
                    for gain, name, k, old, new in kept[:4])
    return [f"outlier channels kept float (split out of the quantized product, added in float "
            f"by the Linear): {len(kept)} of {len(sites)} eligible input quantizer(s), {total} "
            f"channel(s) in all (at most {most} each); largest gains: {top}"]
