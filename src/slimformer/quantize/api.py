"""``quantize(model, config, calib_data) -> QuantResult``: calibrate, reparameterize, reconstruct.

Flow (all methods): build quantizers from the structure map -> observe calibration data in float
-> set ranges -> [repquant: learn dual clipping of per-channel post-norm quantizers] -> [repq,
repquant: reparameterize per-channel scales to one layer-wise scale] -> calibrate weight
quantizers -> [repquant: learn weight rounding with activation quantizers in place] -> quant mode.

repq / repquant (from 8 calibration rows) fit all of that on 3/4 of the calibration rows and
validate every per-site choice on the seeded rest (:mod:`~slimformer.quantize.holdout`); the
result is compared with min/max fitted on the same rows and falls back to it unless clearly
better on the held-out rows.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimformer.errors import CalibrationError
from slimformer.quantize.capture import batches as _batches
from slimformer.quantize.capture import capture_float_inputs as _capture_float_inputs
from slimformer.quantize.capture import capture_one as _capture_one
from slimformer.quantize.capture import float_outputs as _float_outputs
from slimformer.quantize.capture import output_error as _output_error
from slimformer.quantize.check import WeakSite
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.holdout import SiteChoice
from slimformer.quantize.state import QuantizedModel

Progress = Callable[[str, int, int], None] | None


@dataclass
class QuantResult:
    """A quantized model and what calibration did.

    Attributes:
        weak_sites: Quantizers that represent their calibration data badly (SQNR below the floor
            of their bit-width, or data spread under one step), worst first; also in ``notes``.
        output_sqnr_db: SQNR of the model's outputs vs float on the calibration data (dB).
        site_choices: repq / repquant: every per-site choice with the held-out error of each
            candidate (:class:`~slimformer.quantize.holdout.SiteChoice`), the method's own
            (``site == "model"``: repq vs the min/max baseline) last.
    """

    model: QuantizedModel
    calib_samples: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    weak_sites: list[WeakSite] = field(default_factory=list)
    output_sqnr_db: float | None = None
    site_choices: list[SiteChoice] = field(default_factory=list)


def _observe(qmodel: QuantizedModel, calib_data, config: QuantConfig) -> None:
    """Observe the calibration data in at least two batches, each quantizer told which batch.

    The per-site choice (:mod:`~slimformer.quantize.select`) cross-validates across batches, so
    rows of one input never sit on both sides.
    """
    from slimformer.quantize.act import ActQuantizer

    n = min(config.calib_samples, len(calib_data))
    acts = [m for m in qmodel.quant.modules() if isinstance(m, ActQuantizer)]
    with torch.no_grad():
        for i, inputs in enumerate(_batches(calib_data, min(config.calib_batch_size,
                                                            max(1, -(-n // 2))), n)):
            for act in acts:
                act.group = i
            qmodel(**inputs)


def quantize(model: nn.Module, config: QuantConfig, calib_data, structure=None,
             progress: Progress = None, inplace: bool = False) -> QuantResult:
    """Quantize ``model`` post-training.

    Args:
        model: The float model (copied unless ``inplace``).
        config: Method, bit-widths, overrides.
        calib_data: A data set whose items are ``({name: tensor}, label)`` (labels unused).
        structure: Its :class:`~slimformer.models.structure.StructureMap` (discovered if None).
        progress: ``progress(step, done, total)`` callback.
        inplace: Modify ``model`` itself (reparameterization changes its weights).

    Seeded by ``config.seed``; the caller's global torch RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _quantize(model, config, calib_data, structure, progress, inplace)


def _quantize(model: nn.Module, config: QuantConfig, calib_data, structure, progress,
              inplace: bool) -> QuantResult:
    from slimformer.quantize.holdout import split

    t0 = time.perf_counter()
    n = min(config.calib_samples, len(calib_data))
    if n < config.min_calib_samples:
        raise CalibrationError(f"method {config.method} needs at least "
                               f"{config.min_calib_samples} calibration samples, got {n}")
    repq = config.method in ("repq", "repquant")
    fit, held = split(calib_data, n, config.seed) if repq else (calib_data, None)
    original = copy.deepcopy(model) if inplace and held is not None else model
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    if structure is None:
        from slimformer.models.structure import discover

        first = next(_batches(calib_data, 2, 2))
        structure = discover(model, first, require_attention=False)  # build() says why
    tick = (lambda s, d, t: progress(s, d, t)) if progress else (lambda *a: None)
    choices: list[SiteChoice] = []
    qmodel, notes = _calibrate(model, config, fit, structure, tick, held, choices)
    if held is not None:
        notes.insert(0, f"{len(fit)} calibration rows fit, {len(held)} held out (seeded) to "
                        "validate every per-site choice")
        qmodel = _against_minmax(qmodel, original, config, calib_data, fit, held, structure,
                                 notes, choices)
    weak, out_db = _check(qmodel, calib_data, config, notes)
    for act in qmodel.quant.acts.values():
        act._rows, act._min, act._max = [], None, None
    return QuantResult(qmodel, n, time.perf_counter() - t0, notes, weak, out_db, choices)


def _calibrate(model: nn.Module, config: QuantConfig, calib_data, structure, tick, held,
               choices: list[SiteChoice]) -> tuple[QuantizedModel, list[str]]:
    """Build and calibrate the quantized model on ``calib_data``; returns it (quant mode), notes.

    ``held``: held-out rows (:func:`~slimformer.quantize.holdout.split`) every per-site choice is
    validated on, recorded in ``choices``; None: choices by cross-validation on ``calib_data``.
    """
    from slimformer.quantize.build import build
    from slimformer.quantize.holdout import MIN_ROUNDING_HELD, Rows, decide, held_samples
    from slimformer.quantize.reconstruct import reconstruct_linear
    from slimformer.quantize.repq import reparameterize
    from slimformer.quantize.select import (
        MARGIN,
        calibrate_weights,
        select_sites,
        validate_sites,
        validate_weights,
    )

    n = min(config.calib_samples, len(calib_data))
    qmodel = build(model, structure, config)
    state = qmodel.quant
    notes = list(state.notes)

    def held_rows():
        if held is None:
            return None
        return held_samples(qmodel, held, lambda d: _batches(d, config.calib_batch_size,
                                                             config.calib_samples))

    tick("calibrate", 0, 1)
    state.set_mode("observe")
    _observe(qmodel, calib_data, config)
    how = {"minmax": "minmax", "percentile": "percentile"}.get(config.method, "search")
    for act in state.acts.values():
        act.calibrate(how, config.percentile)
    for a in state.attention.values():
        for act in (a.q_in, a.k_in, a.v_in):
            act.calibrate(how, config.percentile)
        if not a.probs_float:
            a.probs.calibrate()
    if config.method in ("repq", "repquant") and config.repq_sites == "auto":  # RepQ where it helps
        notes += select_sites(state, softmax_auto=config.softmax == "auto", held=held_rows(),
                              record=choices)
        if held is not None:  # each site's choice must also lower the model output error
            refs = _float_outputs(qmodel, held, config)
            notes += validate_sites(
                qmodel, held, lambda q, d: _output_error(q, d, config, refs, as_set=True), choices)
    tick("calibrate", 1, 1)

    if config.method == "repquant" and config.clip_steps:
        notes += _dual_clipping(qmodel, calib_data if held is None else held, config, tick,
                                choices)
    if config.method in ("repq", "repquant"):
        notes += reparameterize(qmodel, structure)
    if not structure.norms:
        notes.append("no norm feeds a Linear: norm reparameterization skipped")
    calibrate_weights(state, search=config.method in ("repq", "repquant"),
                      held=held_rows() if config.method != "minmax" else None, record=choices)
    if held is not None and config.method in ("repq", "repquant"):
        refs = _float_outputs(qmodel, held, config)
        notes += validate_weights(qmodel, held, lambda q, d: _output_error(q, d, config, refs),
                                  choices)

    if config.method == "repquant" and config.recon_steps:
        # the rounding is learned on the fit rows and kept only if it lowers the model output
        # error on the held-out ones (a few outputs, e.g. 2 logits a row, overfit)
        fit = calib_data
        if held is None:
            fit, held = Rows(calib_data, range(n - n // 4)), Rows(calib_data, range(n - n // 4, n))
        calls: dict[str, int] = {}
        x_fp = _capture_float_inputs(qmodel, fit, config, calls=calls)
        by_name = {lq.name: lq for lq in state.linears.values()}
        lqs = [by_name[n] for n in x_fp]  # execution order (of first calls)
        kept = 0
        for i, lq in enumerate(lqs):
            # sequential: this layer's inputs with every upstream layer fully quantized; a layer
            # run several times per forward (shared) is captured over all its calls
            x_q = _capture_one(qmodel, lq, fit, config, calls=calls[lq.name])
            if x_q.shape != x_fp[lq.name].shape:  # calls per forward depend on the data
                notes.append(f"{lq.name}: weight rounding not learned (its calls per forward "
                             "vary between batches)")
                continue
            before, after = reconstruct_linear(lq, x_q, x_fp[lq.name], config.recon_steps)
            kept += after < before
            choices.append(SiteChoice(lq.name, "learned rounding",
                                      {"nearest": before, "learned": after},
                                      "learned" if after < before else "nearest",
                                      " (on a held-out quarter of its captured rows)"))
            tick("weight rounding", i + 1, len(lqs))
        notes.append(f"learned weight rounding kept for {kept} of {len(lqs)} layers (lower "
                     "held-out output error than nearest rounding)")
        refs = _float_outputs(qmodel, held, config)  # once, for both roundings
        with_round = _output_error(qmodel, held, config, refs)
        saved = {lq.name: lq.alpha for lq in lqs}
        for lq in lqs:
            lq.alpha = None
        nearest = _output_error(qmodel, held, config, refs)
        choice = decide("model", "learned rounding", {"nearest": nearest, "learned": with_round},
                        MARGIN)
        few = len(held) < MIN_ROUNDING_HELD
        if few and choice.kept == "learned":
            choice = SiteChoice("model", "learned rounding", choice.errors, "nearest",
                                f"; {len(held)} held-out rows are too few to judge it (at least "
                                f"{MIN_ROUNDING_HELD}: give more calibration rows)")
        choices.append(choice)
        if choice.kept == "learned":  # clearly better: small gains do not carry over
            for lq in lqs:
                lq.alpha = saved[lq.name]
            notes.append(f"learned rounding kept: model output error {nearest:.4g} -> "
                         f"{with_round:.4g} on held-out calibration rows")
        elif few:
            notes.append(f"learned rounding dropped: {len(held)} held-out calibration rows are "
                         f"too few to judge it (at least {MIN_ROUNDING_HELD}; model output error "
                         f"{nearest:.4g} -> {with_round:.4g} there)")
        else:
            notes.append(f"learned rounding dropped: it did not cut the model output error on "
                         f"held-out calibration rows by {100 * (1 - MARGIN):.0f}% ({nearest:.4g} "
                         f"-> {with_round:.4g})")
    state.set_mode("quant")
    return qmodel, notes


def _against_minmax(qmodel: QuantizedModel, original: nn.Module, config: QuantConfig,
                    calib_data, fit, held, structure, notes: list[str],
                    choices: list[SiteChoice]) -> QuantizedModel:
    """The repq / repquant model, or the min/max one where that has the lower held-out error.

    Both are fitted on the same ``fit`` rows and judged by the model output error vs float on the
    ``held`` rows; unless repq / repquant is lower by :data:`~slimformer.quantize.holdout.MARGIN`
    the min/max model calibrated on all calibration rows is returned (``repq_sites: all``, the
    published method for ablations, is kept and the loss noted).
    """
    from slimformer.quantize.select import MARGIN

    baseline = config.model_copy(update={"method": "minmax"})
    refs = _float_outputs(qmodel, held, config)
    mine = _output_error(qmodel, held, config, refs)
    mm, _ = _calibrate(copy.deepcopy(original).eval(), baseline, fit, structure,
                       lambda *a: None, None, [])
    theirs = _output_error(mm, held, config, refs)
    qmodel.quant.set_mode("quant")
    better = mine < MARGIN * theirs  # a tie goes to min/max: it is then fitted on all the rows
    keep = better or config.repq_sites == "all"
    choices.append(SiteChoice("model", "method", {"minmax": theirs, config.method: mine},
                              config.method if keep else "minmax",
                              "" if better else f"; {config.method} not {100 * (1 - MARGIN):.0f}%"
                              " below min/max on held-out rows" +
                              (" (kept: repq_sites all)" if keep else "")))
    head = (f"model output error vs float on the held-out calibration rows: {config.method} "
            f"{mine:.4g}, minmax {theirs:.4g}: ")
    if better:
        notes.append(head + f"{config.method} kept")
        return qmodel
    if keep:
        notes.append(head + f"{config.method} kept as asked (repq_sites: all), though min/max "
                     "is better here")
        return qmodel
    notes.append(head + f"fell back to minmax calibrated on all rows ({config.method} was not "
                 f"{100 * (1 - MARGIN):.0f}% better: its choices did not carry to the model "
                 "output)")
    mm, _ = _calibrate(copy.deepcopy(original).eval(), baseline, calib_data, structure,
                       lambda *a: None, None, [])
    return mm


def _dual_clipping(qmodel: QuantizedModel, judge_data, config: QuantConfig, tick,
                   choices: list[SiteChoice]) -> list[str]:
    """Learn the dual clipping of every per-channel activation quantizer; notes.

    Each site's bounds must lower its Linears' output error on rows of other calibration batches
    (:func:`~slimformer.quantize.repq.learn_dual_clipping`); then the model as a whole must gain:
    the output error vs float on ``judge_data`` (the held-out calibration rows) with the learned
    bounds must beat the observed ranges by :data:`~slimformer.quantize.holdout.MARGIN`, else
    every range goes back (recorded in ``choices``). A layer-local gain does not always carry to
    the output (a rare large token clipped).
    """
    from slimformer.quantize.holdout import decide
    from slimformer.quantize.repq import learn_dual_clipping
    from slimformer.quantize.select import MARGIN, calibrate_weights

    state, notes = qmodel.quant, []
    per_channel = [act for act in state.acts.values() if act.per_channel]
    observed = {act.name: (act.lo.detach().clone(), act.hi.detach().clone())
                for act in per_channel}
    kept = 0
    for i, act in enumerate(per_channel):
        ws = [lq.matrix().detach() for lq in state.linears.values() if lq.act is act]
        gain = learn_dual_clipping(act, ws, config.clip_steps)
        kept += gain > 0
        if gain > 0:
            notes.append(f"{act.name}: dual clipping cut the held-out output error by "
                         f"{100 * gain:.1f}%")
        tick("dual clipping", i + 1, len(per_channel))
    if kept < len(per_channel):
        notes.append(f"dual clipping not kept at {len(per_channel) - kept} of {len(per_channel)}"
                     " site(s): no clear gain on held-out calibration rows")
    if not kept:
        return notes
    calibrate_weights(state, search=True)  # the quantized model before reparameterization
    clipped = {act.name: (act.lo.detach().clone(), act.hi.detach().clone())
               for act in per_channel}
    refs = _float_outputs(qmodel, judge_data, config)  # once, for both settings
    with_clip = _output_error(qmodel, judge_data, config, refs)
    for act in per_channel:
        act.set_range(*observed[act.name])
    without = _output_error(qmodel, judge_data, config, refs)
    state.set_mode("observe")
    choices.append(decide("model", "dual clipping", {"observed ranges": without,
                                                     "learned bounds": with_clip}, MARGIN))
    if choices[-1].kept == "learned bounds":
        for act in per_channel:
            act.set_range(*clipped[act.name])
        notes.append(f"dual clipping kept at {kept} site(s): model output error {without:.4g} ->"
                     f" {with_clip:.4g} on the held-out calibration rows")
    else:
        notes.append(f"dual clipping dropped: its {kept} site(s) did not cut the model output "
                     f"error by {100 * (1 - MARGIN):.0f}% ({without:.4g} -> {with_clip:.4g})")
    return notes


def _check(qmodel: QuantizedModel, calib_data, config: QuantConfig,
           notes: list[str]) -> tuple[list[WeakSite], float | None]:
    """Weak sites and the output SQNR; raises when the output collapsed at W8A8."""
    from slimformer.quantize.check import output_sqnr, site_errors

    weak, site_db = site_errors(qmodel.quant)
    out_db = output_sqnr(qmodel, _batches(calib_data, config.calib_batch_size,
                                          config.calib_samples))
    if out_db is not None:
        notes.append(f"model output SQNR vs float on the calibration data: {out_db:.1f} dB")
    for w in weak[:10]:
        notes.append(f"weak site: {w}")
    if len(weak) > 10:
        notes.append(f"... and {len(weak) - 10} more weak site(s)")
    full8 = min(b for lq in qmodel.quant.linears.values() for b in (lq.wq.bits, lq.act.bits)) \
        if len(qmodel.quant.linears) else 0
    floor = config.min_output_sqnr_db
    if floor is not None and full8 >= 8 and out_db is not None and out_db < floor:
        worst = [(w.name, w.sqnr_db) for w in weak]
        worst += sorted(((k, v) for k, v in site_db.items() if k not in dict(worst)),
                        key=lambda kv: kv[1])
        worst = worst[:5]
        raise CalibrationError(
            f"the quantized model's output is at {out_db:.1f} dB SQNR vs float on the "
            f"calibration data, below the {floor:g} dB floor for 8-bit weights and activations: "
            "the quantizers lost the signal. Worst sites (weak ones first): " +
            "; ".join(f"{n} {d:.1f} dB" for n, d in worst) +
            ". Check the scale of the model's activations and the calibration data, or set "
            "min_output_sqnr_db: null to accept it")
    return weak, out_db
