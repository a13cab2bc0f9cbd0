"""Held-out calibration rows: repq / repquant keep a choice only where it holds on unseen rows.

A seeded quarter of the calibration rows (never evaluation rows) is set aside before anything is
fitted. Every per-site choice of repq / repquant (per-channel reparameterized vs per-tensor ranges,
softmax quantizer, weight range search, dual clipping, learned rounding) is fitted on the other
rows and kept only where it also lowers the error on the held-out rows; otherwise the simpler
choice stays. Each decision is a :class:`SiteChoice` (the held-out error of every candidate).
At the model level, repq / repquant are compared with the min/max baseline fitted on the same rows
(model output error vs float on the held-out rows) and fall back to min/max when they lose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# one row in HELD_EVERY is held out, when at least MIN_ROWS calibration rows are given
HELD_EVERY = 4
MIN_ROWS = 8
# A candidate other than the simplest must cut the (held-out or cross-validated) error by 5% or
# more: smaller gains on a few calibration samples do not carry over to new inputs.
MARGIN = 0.95
# learned rounding fits thousands of free choices: judged on fewer held-out rows it was kept on
# noise (random-weight distilbert, 8 held-out rows: 41% below nearest there, 2.1 dB worse on 64
# fresh rows), so it is kept only where at least this many rows judge it
MIN_ROUNDING_HELD = 16


@dataclass(frozen=True)
class SiteChoice:
    """One per-site decision of repq / repquant, judged on held-out calibration rows.

    Attributes:
        site: The quantizer or layer (``in:<weight>``, ``<module>:probs``, a weight name, or
            ``model`` for the method itself).
        what: ``activation range`` / ``softmax`` / ``weight range`` / ``dual clipping`` /
            ``learned rounding`` / ``method``.
        errors: Held-out error of each candidate, ``{candidate: error}`` (squared error of the
            site's output, or the model output error vs float for ``model`` and dual clipping).
        kept: The candidate kept.
        why: Why it was kept, in words.
    """

    site: str
    what: str
    errors: dict[str, float]
    kept: str
    why: str = ""

    def __str__(self) -> str:
        errs = ", ".join(f"{k} {v:.4g}" for k, v in self.errors.items())
        return f"{self.site}: {self.what} {self.kept} (held-out error: {errs}){self.why}"


def decide(site: str, what: str, errors: dict[str, float], margin: float) -> SiteChoice:
    """Keep the candidate with the least held-out error; the first (simplest) one unless beaten.

    Args:
        site: As in :class:`SiteChoice`.
        what: As in :class:`SiteChoice`.
        errors: Held-out error per candidate; the first is the simpler fallback.
        margin: Another candidate must reach ``error < margin * simplest`` (e.g. 0.95).
    """
    names = list(errors)
    simple = names[0]
    best = min(names, key=lambda c: (errors[c] / (1 if c == simple else margin), names.index(c)))
    why = ""
    if best != simple and errors[simple] > 0:
        why = f"; {100 * (1 - errors[best] / errors[simple]):.0f}% below {simple}"
    elif best == simple and len(names) > 1:
        why = f"; no other candidate {100 * (1 - margin):.0f}% below it"
    return SiteChoice(site, what, dict(errors), best, why)


class Rows:
    """The rows ``indices`` of a data set (indexable, with a length), without copying."""

    def __init__(self, data, indices: list[int]):
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.data[self.indices[i]]


def split(data, n: int, seed: int) -> tuple[Rows, Rows | None]:
    """Fit rows and held-out rows among the first ``n`` rows of ``data`` (seeded).

    Returns:
        ``(fit, held)``; ``held`` is None with under :data:`MIN_ROWS` rows (all rows fit then).
    """
    if n < MIN_ROWS:
        return Rows(data, range(n)), None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(perm[: n // HELD_EVERY])
    fit = sorted(perm[n // HELD_EVERY:])
    return Rows(data, fit), Rows(data, held)


@torch.no_grad()
def held_samples(qmodel, held: Rows, batches) -> dict[str, torch.Tensor]:
    """Inputs of every activation and probability quantizer on the held-out rows (float model).

    The quantizers' own observations (of the fit rows) are kept as they were.

    Args:
        qmodel: The :class:`~slimformer.quantize.state.QuantizedModel`.
        held: The held-out rows.
        batches: ``batches(data) -> iterable of input dicts``.

    Returns:
        ``{quantizer name: rows (n, C)}`` (probabilities: a flat sample ``(n,)``), as seen after
        any reparameterization already applied (in the domain the quantizer sees).
    """
    from slimformer.quantize.act import ActQuantizer, ProbQuantizer

    state = qmodel.quant
    mods = [m for m in state.modules() if isinstance(m, (ActQuantizer, ProbQuantizer))]
    saved = {id(m): m.forget() for m in mods}  # the fit rows' observations, put back after
    modes = {id(m): m.mode for m in mods}
    out: dict[str, torch.Tensor] = {}
    try:
        state.set_mode("observe")
        for m in mods:  # observe what the quantizer sees (after a kept per-channel affine)
            if isinstance(m, ActQuantizer) and m.shift is not None:
                m.observe = _observe_transformed(m)
        for inputs in batches(held):
            qmodel(**inputs)
        for m in mods:
            if m.observed:
                out[m.name] = m.samples()
    finally:
        for m in mods:
            m.__dict__.pop("observe", None)
            m.recall(saved[id(m)])
            m.mode = modes[id(m)]
    return out


def _observe_transformed(act):
    cls_observe = type(act).observe

    def observe(x):
        cls_observe(act, act.affine(x))

    return observe
