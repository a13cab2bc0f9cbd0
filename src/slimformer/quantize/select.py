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

With held-out calibration rows (:mod:`~slimformer.quantize.holdout`) every score above is taken
on them instead (fitted on the other rows), and each choice other than min/max must then also
lower the *model output* error on them (:mod:`~slimformer.quantize.validate`): a gain at a
layer's output does not always carry to the model's.
"""

from __future__ import annotations

import torch

from slimformer.quantize.act import ActQuantizer
from slimformer.quantize.holdout import MARGIN, SiteChoice, decide
from slimformer.quantize.quantizers import WeightQuantizer, fake_uniform

Candidate = tuple[str, bool]  # (range rule, per channel)


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
        fit: Rows ``(n, C)`` the ranges are fitted on (float32).
        score: Rows ``(m, C)`` the error is measured on.
        weights: Consumer Linears ``(W (out, C), its weight quantizer)``; empty: the error of the
            activation itself.
        cache: What does not depend on the candidate, computed once per ``score`` rows and reused
            across candidates: each consumer's float output ``score W^T (m, out)`` and quantized
            weight ``Q(W) (out, C)`` (both keyed by the consumer's index); receives the range
            fitted, under ``("range", cand)``.
    """
    how, per_channel = cand
    cache = {} if cache is None else cache
    lo, hi = act.range_of(fit, how, per_channel)
    cache["range", cand] = lo, hi
    s, z = act._params(lo, hi)  # (C,) or ()
    xq = fake_uniform(score, s, z, act.bits)  # (m, C)
    if not weights:
        return float(((xq - score) ** 2).sum())
    total = 0.0
    for i, (w, like) in enumerate(weights):
        if ("ref", i) not in cache:
            cache["ref", i] = score @ w.t()  # (m, out): the float output
        ref = cache["ref", i]
        if per_channel:  # RepQ: one scale mean(s); W' = W diag(r), b' = b - W s (z - z~)
            s_t, z_t = s.mean(), z.mean().round()
            r, shift = s / s_t, s * (z - z_t)  # (C,)
            out = ((xq + shift) / r) @ _quantized(w * r, like).t() - shift @ w.t()  # (m, out)
        else:
            if ("w", i) not in cache:
                cache["w", i] = _quantized(w, like)  # (out, C)
            out = xq @ cache["w", i].t()  # (m, out)
        total += float(((out - ref) ** 2).sum())
    return total


LABEL = {("search", True): "per-channel reparameterized (RepQ)",
         ("minmax", False): "per-tensor min/max", ("search", False): "per-tensor MSE search"}


def _choose(act: ActQuantizer, cands: list[Candidate],
            weights: list[tuple[torch.Tensor, WeightQuantizer]],
            held: torch.Tensor | None = None
            ) -> tuple[Candidate, SiteChoice, tuple[torch.Tensor, torch.Tensor] | None]:
    """The candidate kept at ``act``, the record of the choice, and its range when fitted.

    With ``held`` rows ``(m, C)`` (held-out calibration rows) each candidate is fitted on all of
    the quantizer's sampled rows and scored on ``held``: the kept candidate's range ``(lo, hi)``
    is the one scored (returned, not searched again); else two-fold cross-validated by batch
    (the range: None, to be fitted on all rows).
    """
    rows = act.samples()  # (n, C) float32
    weights = [(w.float(), q) for w, q in weights]
    folds = _folds(rows, act.sample_groups())
    if held is not None and len(held) and held.shape[-1:] == rows.shape[-1:]:
        folds = [(rows, held.float())]
    errs: dict[Candidate, float] = {}
    shared: dict = {}  # Q(W) of the per-tensor candidates: the same for every fold
    for fit, score in folds:
        cache = {k: v for k, v in shared.items() if k[0] == "w"}  # float outputs: per fold
        for c in cands:
            errs[c] = errs.get(c, 0.0) + candidate_error(act, c, fit, score, weights, cache)
        shared.update((k, v) for k, v in cache.items() if k[0] != "ref")
    # cands[0] is min/max per tensor: the others must win clearly (MARGIN)
    choice = decide(act.name, "activation range", {LABEL[c]: errs[c] for c in cands}, MARGIN)
    if len(folds) > 1:  # no held-out rows: say what the errors are
        choice = SiteChoice(choice.site, choice.what, choice.errors, choice.kept,
                            choice.why + " (cross-validated by calibration batch)")
    best = next(c for c in cands if LABEL[c] == choice.kept)
    return best, choice, shared["range", best] if len(folds) == 1 and fit is rows else None


def _set(act: ActQuantizer, best: Candidate, fitted) -> None:
    """Set ``act``'s range by the kept candidate: the searched range already fitted, if any."""
    if fitted is not None and best[0] == "search":
        act.set_range(*fitted)
    else:
        act.calibrate(best[0])


def _per_tensor(act: ActQuantizer) -> list[Candidate]:
    """Per-tensor candidates: min/max, and below 8 bits also the MSE-searched clip.

    At 8 bits a clip buys a few percent of rounding error on the calibration rows and costs more
    on new inputs (measured: -3 dB of model output SQNR on a fan-in initialized BERT).
    """
    return [("minmax", False)] + ([("search", False)] if act.bits < 8 else [])


@torch.no_grad()
def select_sites(state, softmax_auto: bool, held: dict[str, torch.Tensor] | None = None,
                 record: list[SiteChoice] | None = None, progress=None) -> list[str]:
    """Pick every site's range rule (and softmax quantizer) by calibration error; returns notes.

    Call after the activation quantizers observed the calibration data and before
    reparameterization; a per-channel quantizer that loses becomes per tensor (not reparameterized).

    Args:
        state: The :class:`~slimformer.quantize.state.QuantState`.
        softmax_auto: Also choose log-sqrt2 or uniform per attention site.
        held: Held-out rows per quantizer name
            (:func:`~slimformer.quantize.holdout.held_samples`): every candidate is scored on
            them; None: two-fold cross-validation on the calibration rows.
        record: Receives one :class:`~slimformer.quantize.holdout.SiteChoice` per choice.
        progress: ``progress(step, done, total)``, once per site.
    """
    held = held or {}
    record = [] if record is None else record
    users: dict[int, list] = {}
    for lq in state.linears.values():
        users.setdefault(id(lq.act), []).append(lq)
    chosen: dict[Candidate, list[str]] = {}
    fell_back: list[str] = []
    tick = progress or (lambda *a: None)
    total = len(state.acts) + 3 * len(state.attention)
    tick("site choice", 0, total)
    for i, act in enumerate(state.acts.values()):
        consumers = users.get(id(act), [])
        weights = [(lq.matrix().detach(), lq.wq) for lq in consumers]
        if any(w.shape[1] != act._max.shape[-1] for w, _ in weights):
            weights = []  # conv inputs: rows are image channels, not the weight's fan-in
        cands = _per_tensor(act)
        if act.per_channel and weights:
            cands.append(("search", True))
        best, choice, fitted = _choose(act, cands, weights, held.get(act.name))
        if len(cands) > 1:
            record.append(choice)
        if act.per_channel and not best[1]:
            fell_back.append(act.name)
        act.per_channel = best[1]
        _set(act, best, fitted)
        chosen.setdefault(best, []).append(act.name)
        tick("site choice", i + 1, total)
    done = len(state.acts)
    for a in state.attention.values():
        for act in (a.q_in, a.k_in, a.v_in):
            cands = _per_tensor(act)
            best, choice, fitted = _choose(act, cands, [], held.get(act.name))
            if len(cands) > 1:
                record.append(choice)
            _set(act, best, fitted)
            chosen.setdefault(best, []).append(act.name)
            done += 1
            tick("site choice", done, total)
    judged = "held-out calibration rows" if held else "cross-validated calibration error"
    notes = [f"activation ranges chosen per site by {judged}: " +
             ", ".join(f"{len(v)} {LABEL[k]}" for k, v in chosen.items())]
    if fell_back:
        notes.append(f"{len(fell_back)} site(s) per tensor instead of RepQ per channel (lower "
                     f"error): {', '.join(fell_back[:8])}{' ...' if len(fell_back) > 8 else ''}")
    notes += [f"site choice: {c}" for c in record if c.what == "activation range"]
    if softmax_auto:
        kinds: dict[str, int] = {}
        for a in state.attention.values():
            if a.probs_float:
                continue
            errs, deltas = {}, {}
            p_held = held.get(a.probs.name)
            for kind in ("uniform", "log_sqrt2"):  # the simpler one first
                a.probs.kind = kind
                a.probs.calibrate()
                deltas[kind] = a.probs.delta.clone()
                errs[kind] = a.probs.error if p_held is None else \
                    float(((a.probs.quant(p_held) - p_held) ** 2).mean())
            choice = decide(a.probs.name, "softmax", errs, MARGIN)
            record.append(choice)
            a.probs.kind, a.probs.delta = choice.kept, deltas[choice.kept]
            kinds[choice.kept] = kinds.get(choice.kept, 0) + 1
        if kinds:
            how = "on held-out rows" if held else ""
            notes.append(f"softmax quantizer chosen per site by squared error of the probabilities"
                         f"{' ' + how if how else ''}: "
                         + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    return notes


@torch.no_grad()
def calibrate_weights(state, search: bool, held: dict[str, torch.Tensor] | None = None,
                      record: list[SiteChoice] | None = None, progress=None) -> None:
    """Calibrate every weight quantizer; with ``search`` pick min/max or the MSE-searched range.

    The choice is by the error of the layer's output ``||x (Q(W) - W)^T||^2`` on its inputs: the
    held-out rows ``held[act name]`` seen after reparameterization when given, else its sampled
    calibration inputs (in the reparameterized domain); without rows (conv inputs) by the
    weight's own squared error. ``record`` receives one choice per layer; ``progress(step,
    done, total)`` is called once per layer.
    """
    held = held or {}
    tick = progress or (lambda *a: None)
    total = len(state.linears)
    for i, lq in enumerate(state.linears.values()):
        tick("weight ranges", i, total)
        w = lq.matrix().detach()
        if not search:
            lq.wq.calibrate(w, search=False)
            continue
        x = held.get(lq.act.name)  # (n, in) rows, or None
        if x is not None and x.shape[-1] == w.shape[1]:
            x = x.float()
        elif lq.act.width == w.shape[1]:
            x = lq.act.affine(lq.act.samples())
        else:
            x = None
        errs, params = {}, {}
        for flag, name in ((False, "min/max"), (True, "MSE search")):  # min/max is the fallback
            lq.wq.calibrate(w, search=flag)
            d = lq.wq(w) - w  # (out, in)
            errs[name] = float(((x @ d.t()) ** 2).sum()) if x is not None else float((d**2).sum())
            params[name] = (lq.wq.scale.clone(), lq.wq.zero.clone())
        choice = decide(lq.name, "weight range", errs, MARGIN)
        if record is not None and lq.act.name in held:
            record.append(choice)
        lq.wq.scale, lq.wq.zero = params[choice.kept]
    tick("weight ranges", total, total)
