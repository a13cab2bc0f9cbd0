"""The output floor as a fallback: the fewest activation quantizers kept float, by measured effect.

When a W8A8 model's output SQNR vs float is under ``min_output_sqnr_db`` (trained models'
massive activations: a few channels or tokens hundreds of times the median, which one
per-tensor grid cannot hold), :func:`keep_float` keeps activation quantizers float, their
weights quantized, until the floor holds:

1. Candidates: every activation quantizer (Linear inputs, attention q/k/v inputs) in the order of
   its own SQNR on its calibration sample (the check's weak sites first). The first
   :data:`MEASURED` are *measured*: each kept float alone, the model output SQNR on the choice
   rows; they are ranked by that gain, the rest follow in the check's order.
2. The shortest prefix of that ranking whose output SQNR on the choice rows reaches the floor
   (doubling, then bisection: a few forwards).
3. Judged on rows the choice did not rank on: calibration rows past ``calib_samples`` (no
   quantizer saw them) where the data has them, else the seeded held-out quarter of
   :func:`~slimformer.quantize.holdout.split` (repq / repquant ranges were fitted without them;
   min/max ranges saw them, as said in the note). Where the floor fails there, the prefix grows
   on those rows too (noted).

Even all activations float under the floor: None (the caller refuses, as without fallback).
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass, field

import torch

from slimformer.quantize.act import ActQuantizer

# candidates measured alone (one forward over the choice rows each)
MEASURED = 24
# rows the ranking and the prefix are measured on / judged on (each a forward per setting)
CHOICE_ROWS = 16
JUDGE_ROWS = 32


@dataclass
class FloatFallback:
    """What :func:`keep_float` kept float and what it bought.

    Attributes:
        kept: Names of the activation quantizers kept float, in ranked order.
        gains: ``{name: output SQNR (dB) on the choice rows with it alone float}`` of the
            measured candidates.
        before_db / after_db: Output SQNR (dB) on the judge rows without / with the fallback.
        float_mac_fraction: Fraction of the Linears' multiply-accumulates per token (weight
            elements) whose inputs are float.
        attention_inputs: Attention matmul inputs (q/k/v) among ``kept``.
        notes: What was measured, in words.
    """

    kept: list[str]
    gains: dict[str, float]
    before_db: float
    after_db: float
    float_mac_fraction: float
    attention_inputs: int
    notes: list[str] = field(default_factory=list)

    def patterns(self) -> list[str]:
        """``kept`` as ``float_activations`` patterns (glob characters escaped)."""
        return [glob.escape(n) for n in self.kept]


class _Rows:
    """A row set with its float outputs; :meth:`db` gives the quantized model's output SQNR."""

    def __init__(self, qmodel, rows, config):
        from slimformer.quantize.capture import batches, real_positions
        from slimformer.quantize.check import float_leaves

        self.qmodel, self.forwards = qmodel, 0
        self.inputs = list(batches(rows, config.calib_batch_size, len(rows)))
        self._leaves = lambda out, inp: [real_positions(t, inp) for t in float_leaves(out)]
        self.refs = self._run("float")

    @torch.no_grad()
    def _run(self, mode: str) -> list[list[torch.Tensor]]:
        self.qmodel.quant.set_mode(mode)
        outs = []
        for i, inp in enumerate(self.inputs):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(i)
                outs.append(self._leaves(self.qmodel(**inp), inp))
        return outs

    def db(self) -> float:
        """Output SQNR (dB) vs float of the model as its quantizers are set now."""
        self.forwards += 1
        sig = err = 0.0
        for ref, got in zip(self.refs, self._run("quant"), strict=True):
            for r, g in zip(ref, got, strict=True):
                sig += float((r.double() ** 2).sum())
                err += float(((g.double() - r.double()) ** 2).sum())
        return math.inf if err == 0 else 10 * math.log10(sig / err) if sig else -math.inf


def _set(acts: list[ActQuantizer], kept: set[str]) -> None:
    for a in acts:
        a.keep_float = a.name in kept


def _shortest(rows: _Rows, acts, order: list[str], start: int, floor: float) -> int | None:
    """Smallest ``k > start`` whose prefix ``order[:k]`` float reaches ``floor`` (None: none)."""
    lo, k = start, max(start + 1, 1)
    while True:
        _set(acts, set(order[:k]))
        if rows.db() >= floor:
            break
        if k == len(order):
            return None
        lo, k = k, min(len(order), 2 * k)
    hi = k  # order[:hi] passes, order[:lo] fails (or lo == start)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        _set(acts, set(order[:mid]))
        if rows.db() >= floor:
            hi = mid
        else:
            lo = mid
    return hi


def _row_sets(calib_data, config):
    """(choice rows, judge rows, how the judge rows relate to calibration, in words)."""
    from slimformer.quantize.holdout import Rows, split

    n = min(config.calib_samples, len(calib_data))
    if len(calib_data) > n:
        judge = Rows(calib_data, range(n, min(len(calib_data), n + JUDGE_ROWS)))
        return (Rows(calib_data, range(min(n, CHOICE_ROWS))), judge,
                f"{len(judge)} calibration rows past the {n} calibrated on (unseen by any "
                "quantizer and by the choice)")
    fit, held = split(calib_data, n, config.seed)
    if held is None:
        return (fit, fit, f"only {n} calibration rows: the choice is judged on the rows it was "
                "made on (from 8 rows on a held-out quarter judges it)")
    return (Rows(calib_data, fit.indices[:CHOICE_ROWS]),
            Rows(calib_data, held.indices[:JUDGE_ROWS]),
            f"the seeded held-out quarter of the calibration rows ({len(held)}; not ranked on; "
            "repq / repquant ranges were fitted without them, min/max ranges with them)")


def keep_float(qmodel, calib_data, config, ranked: list[str], floor: float,
               progress=None) -> FloatFallback | None:
    """Keep the fewest activation quantizers float so the output reaches ``floor`` dB.

    Args:
        qmodel: The quantized model (quant mode, ranges calibrated); its quantizers'
            ``keep_float`` are left as returned (all cleared on None).
        calib_data: The calibration data set.
        config: Its :class:`~slimformer.quantize.config.QuantConfig`.
        ranked: Quantizer names in the check's order (weak sites first, then by own SQNR).
        floor: The output SQNR floor (dB).
        progress: ``progress(step, done, total)``.

    Returns:
        The :class:`FloatFallback`, or None when all activations float miss the floor too.
    """
    tick = progress or (lambda *a: None)
    acts = [m for m in qmodel.quant.modules() if isinstance(m, ActQuantizer) and m.observed
            and not m.keep_float]
    names = {a.name for a in acts}
    order = [n for n in ranked if n in names]
    order += [a.name for a in acts if a.name not in set(order)]
    choice, judge, how = _row_sets(calib_data, config)
    crow = _Rows(qmodel, choice, config)
    _set(acts, set())
    before = crow.db()
    gains: dict[str, float] = {}
    head = order[:MEASURED]
    for i, name in enumerate(head):
        _set(acts, {name})
        gains[name] = crow.db()
        tick("float-activation ranking", i + 1, len(head))
    order = sorted(head, key=lambda n: -gains[n]) + order[MEASURED:]
    k = _shortest(crow, acts, order, 0, floor)
    notes = [f"output-floor fallback: output SQNR {before:.1f} dB on {len(choice)} choice rows, "
             f"below the {floor:g} dB floor; {len(head)} activation quantizers measured float "
             "alone (best: " + ", ".join(f"{n} {gains[n]:.1f} dB" for n in order[:3]) + ")"]
    if k is None:
        _set(acts, set())
        return None
    jrow = crow if judge is choice else _Rows(qmodel, judge, config)
    _set(acts, set())
    judged_before = jrow.db()
    _set(acts, set(order[:k]))
    after = jrow.db()
    notes.append(f"{k} kept float reach {floor:g} dB on the choice rows; judged on {how}: "
                 f"{judged_before:.1f} -> {after:.1f} dB")
    if after < floor:
        k2 = _shortest(jrow, acts, order, k, floor)
        if k2 is None:
            _set(acts, set())
            return None
        _set(acts, set(order[:k2]))
        after = jrow.db()
        notes.append(f"below the floor on the judge rows: {k2 - k} more kept float there "
                     f"({after:.1f} dB; those rows then took part in the choice)")
        k = k2
    kept = order[:k]
    _set(acts, set(kept))
    frac, attn = float_cost(qmodel, set(kept))
    notes.append(f"{len(kept)} of {len(acts)} activation quantizers kept float (weights stay "
                 f"quantized): {100 * frac:.1f}% of the Linears' multiply-accumulates per token "
                 f"take float inputs, {attn} attention matmul input(s); " + ", ".join(kept))
    forwards = crow.forwards + (jrow.forwards if jrow is not crow else 0)
    notes.append(f"output-floor fallback: {forwards} quantized forwards")
    return FloatFallback(kept, gains, judged_before, after, frac, attn, notes)


def float_cost(qmodel, kept: set[str]) -> tuple[float, int]:
    """(fraction of Linear weight elements whose inputs are kept float, attention inputs kept)."""
    state = qmodel.quant
    total = sum(lq.param[0].numel() for lq in state.linears.values())
    floated = sum(lq.param[0].numel() for lq in state.linears.values() if lq.act.name in kept)
    attn = sum(a.name in kept for at in state.attention.values()
               for a in (at.q_in, at.k_in, at.v_in))
    return (floated / total if total else 0.0), attn
