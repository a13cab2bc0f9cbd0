"""Per-site choice of ranges and quantizers for repq / repquant, by calibration error.

RepQ's per-channel ranges (reparameterized to one layer-wise scale) are not always better than
plain per-tensor ranges: fitted on few rows they overfit, and the scaled weight columns are
harder to quantize. So, per site, the candidates are compared on the calibration data:

- activation quantizers feeding Linears: per-channel ranges reparameterized (RepQ; post-norm and
  MLP fc2 inputs only), per-tensor min/max, per-tensor MSE search (below 8 bits). Score: the
  squared error of the consumer Linears' outputs with their weights quantized as they will be,
  ``sum ||Q(x) Q(W)^T - x W^T||^2``, two-fold cross-validated on the sampled calibration rows
  (ranges fitted on half of the calibration batches, scored on the other half, and back); a
  candidate other than per-tensor min/max must win by :data:`MARGIN`;
- other activation quantizers (attention q/k/v, conv inputs): per-tensor min/max or search, by
  their own cross-validated squared error;
- attention probabilities, when the config leaves the softmax quantizer to ``auto``: log-sqrt2
  or uniform, by the squared error of the probabilities (log-sqrt2 must win by the margin);
- weights: per-channel min/max or MSE-searched range, by the error of the layer's output on the
  calibration rows (the search must win by the margin).
"""

from __future__ import annotations

import torch

from slimformer.quantize.act import ActQuantizer
from slimformer.quantize.quantizers import WeightQuantizer, fake_uniform

Candidate = tuple[str, bool]  # (range rule, per channel)
# A candidate other than per-tensor min/max must cut the cross-validated error by 5% or more:
# smaller gains on a few calibration samples do not carry over to new inputs.
MARGIN = 0.95


def _folds(rows: torch.Tensor, groups: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two (fit, score) splits of ``rows (n, C)`` by calibration batch (``groups (n,)``).

    Rows of one input (tokens of a sequence, pixels of an image) are alike, so they stay on one
    side; with a single batch the rows are split at random, and with under 4 rows the error is
    scored on the fit rows.
    """
    if len(rows) < 4:
        return [(rows, rows)]
    odd = groups % 2 == 1
    if odd.all() or not odd.any():
        odd = torch.zeros(len(rows), dtype=torch.bool)
        odd[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[
            : len(rows) // 2]] = True
    a, b = rows[~odd], rows[odd]
    return [(a, b), (b, a)]


def _quantized(w: torch.Tensor, like: WeightQuantizer, search: bool = True) -> torch.Tensor:
    """``w (out, in)`` fake-quantized per output channel as ``like`` would (same grid flags)."""
    wq = WeightQuantizer(like.bits)
    wq.symmetric, wq.pow2 = like.symmetric, like.pow2
    wq.calibrate(w, search=search)
    return wq(w)


def candidate_error(act: ActQuantizer, cand: Candidate, fit: torch.Tensor, score: torch.Tensor,
                    weights: list[tuple[torch.Tensor, WeightQuantizer]],
                    cache: dict | None = None) -> float:
    """Squared error on ``score`` rows of candidate ``cand`` with ranges fitted on ``fit`` rows.

    Args:
        act: The quantizer (its bits and grid flags).
        cand: ``(how, per_channel)``.
        fit: Rows ``(n, C)`` the ranges are fitted on (float64).
        score: Rows ``(m, C)`` the error is measured on.
        weights: Consumer Linears ``(W (out, C), its weight quantizer)``; empty: the error of the
            activation itself.
        cache: Quantized weights of the per-tensor candidates, reused across candidates.
    """
    how, per_channel = cand
    lo, hi = act.range_of(fit, how, per_channel)
    s, z = act._params(lo, hi)
    xq = fake_uniform(score, s, z, act.bits)
    if not weights:
        return float(((xq - score) ** 2).sum())
    total = 0.0
    for i, (w, like) in enumerate(weights):
        ref = score @ w.t()
        if per_channel:  # RepQ: one scale mean(s); W' = W diag(r), b' = b - W s (z - z~)
            s_t, z_t = s.mean(), z.mean().round()
            r, shift = s / s_t, s * (z - z_t)
            out = ((xq + shift) / r) @ _quantized(w * r, like).t() - shift @ w.t()
        else:
            cache = {} if cache is None else cache
            if i not in cache:
                cache[i] = _quantized(w, like)
            out = xq @ cache[i].t()
        total += float(((out - ref) ** 2).sum())
    return total


def _choose(act: ActQuantizer, cands: list[Candidate],
            weights: list[tuple[torch.Tensor, WeightQuantizer]]) -> Candidate:
    rows = act.samples().double()
    weights = [(w.double(), q) for w, q in weights]
    errs: dict[Candidate, float] = {}
    cache: dict = {}  # per-tensor candidates share the quantized weights
    for fit, score in _folds(rows, act.sample_groups()):
        for c in cands:
            errs[c] = errs.get(c, 0.0) + candidate_error(act, c, fit, score, weights, cache)
    # cands[0] is min/max per tensor: the others must win clearly (MARGIN)
    return min(cands, key=lambda c: (errs[c] / (1 if c == cands[0] else MARGIN), cands.index(c)))


def _per_tensor(act: ActQuantizer) -> list[Candidate]:
    """Per-tensor candidates: min/max, and below 8 bits also the MSE-searched clip.

    At 8 bits a clip buys a few percent of rounding error on the calibration rows and costs more
    on new inputs (measured: -3 dB of model output SQNR on a fan-in initialized BERT).
    """
    return [("minmax", False)] + ([("search", False)] if act.bits < 8 else [])


@torch.no_grad()
def select_sites(state, softmax_auto: bool) -> list[str]:
    """Pick every site's range rule (and softmax quantizer) by calibration error; returns notes.

    Call after the activation quantizers observed the calibration data and before
    reparameterization; a per-channel quantizer that loses becomes per tensor (not reparameterized).
    """
    users: dict[int, list] = {}
    for lq in state.linears.values():
        users.setdefault(id(lq.act), []).append(lq)
    chosen: dict[Candidate, list[str]] = {}
    fell_back: list[str] = []
    for act in state.acts.values():
        consumers = users.get(id(act), [])
        weights = [(lq.matrix().detach(), lq.wq) for lq in consumers]
        if any(w.shape[1] != act._max.shape[-1] for w, _ in weights):
            weights = []  # conv inputs: rows are image channels, not the weight's fan-in
        cands = _per_tensor(act)
        if act.per_channel and weights:
            cands.append(("search", True))
        best = _choose(act, cands, weights)
        if act.per_channel and not best[1]:
            fell_back.append(act.name)
        act.per_channel = best[1]
        act.calibrate(best[0])
        chosen.setdefault(best, []).append(act.name)
    for a in state.attention.values():
        for act in (a.q_in, a.k_in, a.v_in):
            best = _choose(act, _per_tensor(act), [])
            act.calibrate(best[0])
            chosen.setdefault(best, []).append(act.name)
    label = {("search", True): "per-channel reparameterized (RepQ)",
             ("minmax", False): "per-tensor min/max", ("search", False): "per-tensor MSE search"}
    notes = ["activation ranges chosen per site by cross-validated calibration error: " +
             ", ".join(f"{len(v)} {label[k]}" for k, v in chosen.items())]
    if fell_back:
        notes.append(f"{len(fell_back)} site(s) per tensor instead of RepQ per channel (lower "
                     f"error): {', '.join(fell_back[:8])}{' ...' if len(fell_back) > 8 else ''}")
    if softmax_auto:
        kinds: dict[str, int] = {}
        for a in state.attention.values():
            if a.probs_float:
                continue
            errs = {}
            for kind in ("log_sqrt2", "uniform"):
                a.probs.kind = kind
                a.probs.calibrate()
                errs[kind] = (a.probs.error, a.probs.delta.clone())
            best = "log_sqrt2" if errs["log_sqrt2"][0] < MARGIN * errs["uniform"][0] else "uniform"
            a.probs.kind, a.probs.delta = best, errs[best][1]
            kinds[best] = kinds.get(best, 0) + 1
        if kinds:
            notes.append("softmax quantizer chosen per site by squared error of the probabilities: "
                         + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    return notes


@torch.no_grad()
def calibrate_weights(state, search: bool) -> None:
    """Calibrate every weight quantizer; with ``search`` pick min/max or the MSE-searched range.

    The choice is by the error of the layer's output ``||x (Q(W) - W)^T||^2`` on its sampled
    calibration inputs (in the reparameterized domain); without rows (conv inputs) by the
    weight's own squared error.
    """
    for lq in state.linears.values():
        w = lq.matrix().detach()
        if not search:
            lq.wq.calibrate(w, search=False)
            continue
        x = None
        if lq.act._rows and lq.act._rows[0].shape[-1] == w.shape[1]:
            x = lq.act.transform(lq.act.samples()).double()
        best = None
        for flag in (False, True):  # min/max first: the search must win by MARGIN
            lq.wq.calibrate(w, search=flag)
            d = (lq.wq(w) - w).double()
            err = float(((x @ d.t()) ** 2).sum()) if x is not None else float((d**2).sum())
            if best is None or err < MARGIN * best[0]:
                best = (err, lq.wq.scale.clone(), lq.wq.zero.clone())
        lq.wq.scale, lq.wq.zero = best[1], best[2]
