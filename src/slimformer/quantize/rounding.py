"""repquant's learned weight rounding: per layer, sequentially, then judged at the model output.

Each quantized Linear, in execution order, learns AdaRound-style soft rounding on its inputs in
the quantized model (every upstream layer already quantized) against its float inputs
(:func:`~slimformer.quantize.reconstruct.reconstruct_linear`); a layer keeps it where a held-out
quarter of its captured rows gains. The rounding as a whole is then kept only if it lowers the
model output error on the held-out calibration rows by
:data:`~slimformer.quantize.holdout.MARGIN`, judged by at least
:data:`~slimformer.quantize.holdout.MIN_ROUNDING_HELD` rows (a few outputs, e.g. 2 logits a row,
overfit).
"""

from __future__ import annotations

from slimformer.quantize.capture import capture_float_inputs, capture_one, float_outputs
from slimformer.quantize.capture import output_error as _output_error
from slimformer.quantize.holdout import MARGIN, MIN_ROUNDING_HELD, Rows, SiteChoice, decide


def learned_rounding(run) -> None:
    """Learn every layer's rounding on the fit rows, keep it if the held-out rows gain.

    Args:
        run: The :class:`~slimformer.quantize.phases.Calibration` (its notes and choices
            receive the outcome). Without held-out rows the last quarter of its rows judge.
    """
    fit, held = run.data, run.held
    if held is None:
        n = min(run.config.calib_samples, len(run.data))
        fit, held = Rows(run.data, range(n - n // 4)), Rows(run.data, range(n - n // 4, n))
    lqs = _learn_layers(run, fit)
    _judge(run, lqs, held)


def _learn_layers(run, fit) -> list:
    """Learn the rounding of every layer in execution order; the layers (alpha set where kept)."""
    state, config = run.qmodel.quant, run.config
    calls: dict[str, int] = {}
    x_fp = capture_float_inputs(run.qmodel, fit, config, calls=calls)
    by_name = {lq.name: lq for lq in state.linears.values()}
    lqs = [by_name[n] for n in x_fp]  # execution order (of first calls)
    kept = 0
    for i, lq in enumerate(lqs):
        kept += _learn_one(run, lq, fit, x_fp[lq.name], calls[lq.name])
        run.tick("weight rounding", i + 1, len(lqs))
    run.notes.append(f"learned weight rounding kept for {kept} of {len(lqs)} layers (lower "
                     "held-out output error than nearest rounding)")
    return lqs


def _learn_one(run, lq, fit, x_fp, calls: int) -> bool:
    """Learn ``lq``'s rounding on its quantized-model inputs; whether it was kept."""
    from slimformer.quantize.reconstruct import reconstruct_linear

    # sequential: this layer's inputs with every upstream layer fully quantized; a layer run
    # several times per forward (shared) is captured over all its calls
    x_q = capture_one(run.qmodel, lq, fit, run.config, calls=calls)
    if x_q.shape != x_fp.shape:  # calls per forward depend on the data
        run.notes.append(f"{lq.name}: weight rounding not learned (its calls per forward vary "
                         "between batches)")
        return False
    before, after = reconstruct_linear(lq, x_q, x_fp, run.config.recon_steps)
    run.choices.append(SiteChoice(lq.name, "learned rounding",
                                  {"nearest": before, "learned": after},
                                  "learned" if after < before else "nearest",
                                  " (on a held-out quarter of its captured rows)"))
    return after < before


def _judge(run, lqs: list, held) -> None:
    """Keep the learned rounding of ``lqs`` only if it lowers the model output error on ``held``."""
    config = run.config
    refs = float_outputs(run.qmodel, held, config)  # once, for both roundings
    with_round = _output_error(run.qmodel, held, config, refs)
    saved = {lq.name: lq.alpha for lq in lqs}
    for lq in lqs:
        lq.alpha = None
    nearest = _output_error(run.qmodel, held, config, refs)
    choice = decide("model", "learned rounding", {"nearest": nearest, "learned": with_round},
                    MARGIN)
    few = len(held) < MIN_ROUNDING_HELD
    if few and choice.kept == "learned":
        choice = SiteChoice("model", "learned rounding", choice.errors, "nearest",
                            f"; {len(held)} held-out rows are too few to judge it (at least "
                            f"{MIN_ROUNDING_HELD}: give more calibration rows)")
    run.choices.append(choice)
    if choice.kept == "learned":  # clearly better: small gains do not carry over
        for lq in lqs:
            lq.alpha = saved[lq.name]
        run.notes.append(f"learned rounding kept: model output error {nearest:.4g} -> "
                         f"{with_round:.4g} on held-out calibration rows")
    elif few:
        run.notes.append(f"learned rounding dropped: {len(held)} held-out calibration rows are "
                         f"too few to judge it (at least {MIN_ROUNDING_HELD}; model output error"
                         f" {nearest:.4g} -> {with_round:.4g} there)")
    else:
        run.notes.append(f"learned rounding dropped: it did not cut the model output error on "
                         f"held-out calibration rows by {100 * (1 - MARGIN):.0f}% ({nearest:.4g}"
                         f" -> {with_round:.4g})")
