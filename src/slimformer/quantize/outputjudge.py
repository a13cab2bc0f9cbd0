"""Settings of one model compared by the held-out model output error (the model-level judges).

The SmoothQuant migration (:mod:`~slimformer.quantize.smoothjudge`) and the online input rotation
(:mod:`~slimformer.quantize.rotatejudge`) are kept only where the model output error vs float
(:func:`~slimformer.quantize.capture.output_error`) on held-out calibration rows falls by
:data:`~slimformer.quantize.holdout.MARGIN`: each setting is calibrated on the fit rows and judged
on the held-out ones, against the float outputs of the first.
"""

from __future__ import annotations

from slimformer.quantize.capture import float_outputs, output_error
from slimformer.quantize.holdout import MARGIN, SiteChoice
from slimformer.quantize.phases import calibrate


def held_out_errors(model, structure, fit, held, config, trials: list[tuple], tick=None
                    ) -> dict[str, float]:
    """``{label: held-out output error}`` of each trial ``(label, proxy, step, before)``.

    ``before()`` (or None) runs first (it may change the model's weights); the model is then
    calibrated on ``fit`` with the ``proxy`` config, ``step`` names it in the progress.
    """
    tick = tick or (lambda *a: None)
    errs: dict[str, float] = {}
    refs = None
    for label, proxy, step, before in trials:
        if before is not None:
            before()
        qm, _ = calibrate(model, proxy, fit, structure,
                          lambda s, d, t, step=step: tick(f"{step}: {s}", d, t), None, [])
        if refs is None:
            tick(f"{step}: float outputs of the held-out rows", 0, 1)
            refs = float_outputs(qm, held, config)
        tick(f"{step}: output error", 0, 1)
        errs[label] = output_error(qm, held, config, refs)
        tick(f"{step}: output error", 1, 1)
        qm.release()  # its hooks would keep its quantizers alive
        del qm
    return errs


def decide(choices: list, site: str, what: str, errs: dict[str, float], new: str, old: str,
           words: tuple[str, str]) -> bool:
    """Whether ``new`` is :data:`MARGIN` below ``old``; the decision appended to ``choices``.

    ``words``: how the note names the two (``("migrated", "off")``).
    """
    keep = errs[new] < MARGIN * errs[old]
    choices.append(SiteChoice(site, what, errs, new if keep else old,
                              "" if keep else f"; {words[0]} not {100 * (1 - MARGIN):.0f}% below "
                              f"{words[1]} at the model output"))
    return keep
