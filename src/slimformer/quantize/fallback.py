"""Mixed precision by measured sensitivity: the fewest sites at 8 bits or float to meet a budget.

The criteria are the config's ``budget`` (:mod:`~slimformer.quantize.budget`: ``1pt``,
``3%ppl``, ``30dB``) and, at W8A8, the output floor ``min_output_sqnr_db`` (a dB budget).
Where the quantized model misses them, :func:`fallback` moves activation sites
(:mod:`~slimformer.quantize.tiers`: an activation quantizer and the Linears it feeds) up:

1. Ranking, once per tier: every site's first-order share of the output error from one forward
   and backward over :data:`RANK_ROWS` calibration rows (:mod:`~slimformer.quantize.sensitivity`).
2. Configs below 8 bits: the shortest prefix of the 8-bit ranking (weights and input at 8 bits)
   that meets the criteria (doubling, then bisection: a few forwards).
3. Where every site at 8 bits still misses them: the shortest prefix of the float ranking
   (re-ranked from there; the input kept float, the weights at 8 bits), then again the shortest
   8-bit prefix beside those float sites. Weight-only (activations float already): a site is
   the Linears that share an input, its 8-bit tier their weights at 8 bits; no float tier.
4. Judged on rows no quantizer saw (the search measures on them, so the result is the measured
   value there): calibration rows past ``calib_samples`` where the data has them, else the seeded
   held-out quarter of :func:`~slimformer.quantize.holdout.split` (repq / repquant ranges were
   fitted without them; min/max ranges saw them, as the note says).

Not met even with every site float: :attr:`Fallback.met` is False and the quantizers are back
as they were (the caller refuses).
"""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass, field

from slimformer.quantize.budget import ROWS, Budget
from slimformer.quantize.config import LayerOverride
from slimformer.quantize.judge import Judge
from slimformer.quantize.tiers import finalize, sites

RANK_ROWS = 16  # calibration rows the ranking differentiates on


@dataclass
class Fallback:
    """What :func:`fallback` moved and what it bought.

    Attributes:
        met: Whether the criteria hold on the judge rows (else nothing was changed).
        eight_bit: Activation sites at 8 bits (not float), as a rebuild names them.
        eight_bit_linears: The Linear weights of the 8-bit and float sites now at 8 bits.
        kept: Activation quantizers kept float, as a rebuild names them.
        before / after: The judge rows' metrics (:meth:`~slimformer.quantize.budget.Judge.measure`)
            without / with the change.
        bytes_delta: Packed weight bytes the 8-bit weights add to the artifact.
        float_mac_fraction: Fraction of the Linears' multiply-accumulates per token whose inputs
            are float.
        attention_inputs: Attention matmul inputs (q/k/v) among ``kept``.
        overrides: The config overrides that rebuild the 8-bit weights and inputs.
        notes: What was measured, in words.
    """

    met: bool
    eight_bit: list[str]
    eight_bit_linears: list[str]
    kept: list[str]
    before: dict[str, float]
    after: dict[str, float]
    bytes_delta: int
    float_mac_fraction: float
    attention_inputs: int
    overrides: list[LayerOverride] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def patterns(self) -> list[str]:
        """``kept`` as ``float_activations`` patterns (glob characters escaped)."""
        return [glob.escape(n) for n in self.kept]


def _row_sets(calib_data, config, judge_rows: int):
    """(ranking rows, judge rows, how the judge rows relate to calibration, in words)."""
    from slimformer.quantize.holdout import Rows, split

    n = min(config.calib_samples, len(calib_data))
    if len(calib_data) > n:
        judge = Rows(calib_data, range(n, min(len(calib_data), n + judge_rows)))
        return (Rows(calib_data, range(min(n, RANK_ROWS))), judge,
                f"{len(judge)} calibration rows past the {n} calibrated on (unseen by any "
                "quantizer)")
    fit, held = split(calib_data, n, config.seed)
    if held is None:
        return (fit, fit, f"only {n} calibration rows: judged on the rows it was calibrated on "
                "(from 8 rows on a held-out quarter judges it)")
    return (Rows(calib_data, fit.indices[:RANK_ROWS]),
            Rows(calib_data, held.indices[:judge_rows]),
            f"{min(len(held), judge_rows)} rows of the seeded held-out quarter of the "
            "calibration rows (repq / repquant ranges were fitted without them, min/max ranges "
            "with them)")


def _shortest(ok, n: int) -> int | None:
    """Smallest ``k`` in ``1..n`` with ``ok(k)``, assuming monotone (doubling, bisection)."""
    lo, k = 0, 1
    while not ok(k):
        if k >= n:
            return None
        lo, k = k, min(n, 2 * k)
    hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _metrics(m: dict[str, float], criteria: list[Budget]) -> str:
    return ", ".join(c.describe(m) for c in criteria)


def fallback(qmodel, calib_data, config, criteria: list[Budget], progress=None) -> Fallback | None:
    """Move the fewest activation sites to 8 bits, then float, until ``criteria`` hold.

    Args:
        qmodel: The quantized model (quant mode, ranges calibrated, observations kept).
        calib_data: The calibration data set.
        config: Its :class:`~slimformer.quantize.config.QuantConfig`.
        criteria: Budgets that must all hold on the judge rows.
        progress: ``progress(step, done, total)``.

    Returns:
        None when the criteria already hold (nothing changed), else the :class:`Fallback`
        (``met`` False: not reachable, the quantizers left as they were).
    """
    from slimformer.quantize.sensitivity import rank

    tick = progress or (lambda *a: None)
    t0 = time.process_time()
    kinds = {c.kind for c in criteria}
    rank_rows, judge_rows, how = _row_sets(calib_data, config, max(ROWS[k] for k in kinds))
    judge = Judge(qmodel, judge_rows, config.calib_batch_size, kinds)
    last: dict = {}

    def ok() -> bool:
        last["m"] = judge.measure()
        return all(c.met(last["m"]) for c in criteria)

    all_sites = sites(qmodel)
    kind = criteria[0].kind
    if ok():
        return None
    before = last["m"]
    head = (f"budget ({', '.join(map(str, criteria))}) missed: {_metrics(before, criteria)} on "
            f"{how}")
    by_name = {s.name: s for s in all_sites}

    def configure(eight: set[str], floats: set[str]) -> None:
        for s in all_sites:
            s.set(2 if s.name in floats else 1 if s.name in eight else 0)

    tick("precision ranking", 0, 2)
    gains = rank(qmodel, rank_rows, all_sites, kind)
    ranked = 1
    order8 = sorted((s.name for s in all_sites if s.can8), key=lambda n: -gains[n][0])
    floats: list[str] = []
    k8 = None
    if order8:
        k8 = _shortest(lambda k: (configure(set(order8[:k]), set()), ok())[1], len(order8))

    def missed(reached: str) -> Fallback:  # the quantizers back as they were
        worst = last["m"]
        configure(set(), set())
        return Fallback(False, [], [], [], before, worst, 0, 0.0, 0, [], [
            head, f"not met with {reached}: {_metrics(worst, criteria)}"])

    if k8 is None and config.weight_only:  # activations are float already: no float tier
        return missed("every quantized Linear's weights at 8 bits")
    if k8 is None:
        configure(set(order8), set())
        gains = rank(qmodel, rank_rows, all_sites, kind)
        ranked += 1
        order2 = sorted(by_name, key=lambda n: -gains[n][1])
        k2 = _shortest(lambda k: (configure(set(order8), set(order2[:k])), ok())[1], len(order2))
        if k2 is None:
            return missed("every activation site float (weights at 8 bits)")
        floats = order2[:k2]
        k8 = 0 if not order8 else _shortest(
            lambda k: (configure(set(order8[:k]), set(floats)), ok())[1], len(order8))
    eight = [n for n in order8[:k8] if n not in floats]
    configure(set(eight), set(floats))
    ok()
    after = last["m"]
    chosen = [by_name[n] for n in [*eight, *floats]]
    linears = [lq.name for s in chosen if s.can8 for lq in s.linears]
    nbytes = sum(s.bytes_delta() for s in chosen)
    overrides, _ = finalize(qmodel, chosen)
    eight_names = [by_name[n].act.name for n in eight]
    kept = [by_name[n].act.name for n in floats]
    frac, attn = float_cost(qmodel, set(kept))
    cpu = time.process_time() - t0
    notes = [head, f"ranked by each site's first-order share of the output error ({ranked} "
             f"forward+backward pass(es) over {len(rank_rows)} calibration rows); best: " +
             ", ".join(order8[:3] if eight else floats[:3])]
    if eight:
        what = "weights; activations float" if config.weight_only else "weights and input"
        notes.append(f"{len(eight)} of {len(all_sites)} activation sites at 8 bits ({what}; "
                     f"{sum(len(by_name[n].linears) for n in eight)} Linear(s)): " +
                     ", ".join(eight_names))
    if kept:
        notes.append(f"{len(kept)} of {len(all_sites)} activation quantizers kept float (weights "
                     f"stay quantized): {100 * frac:.1f}% of the Linears' multiply-accumulates per "
                     f"token take float inputs, {attn} attention matmul input(s); " +
                     ", ".join(kept))
    notes.append(f"budget met: {_metrics(before, criteria)} -> {_metrics(after, criteria)} on "
                 f"{how}; +{nbytes / 1e6:.3f} MB of 8-bit weights; {judge.forwards} quantized "
                 f"forwards, {cpu:.1f} CPU-s")
    return Fallback(True, eight_names, linears, kept, before, after, nbytes, frac, attn,
                    overrides, notes)


def float_cost(qmodel, kept: set[str]) -> tuple[float, int]:
    """(fraction of Linear weight elements whose inputs are kept float, attention inputs kept)."""
    state = qmodel.quant
    total = sum(lq.param[0].numel() for lq in state.linears.values())
    floated = sum(lq.param[0].numel() for lq in state.linears.values() if lq.act.name in kept)
    attn = sum(a.name in kept for at in state.attention.values()
               for a in (at.q_in, at.k_in, at.v_in))
    return (floated / total if total else 0.0), attn
